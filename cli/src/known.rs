//! What this client has seen of each protected repository (spec/format.md §18.9): its
//! protection and key check, and the newest restore point by sequence at each location it
//! was read or written at. A repository that later shows less (an older newest point
//! where it was seen newer: a rollback; no protection any more: a downgrade) is refused,
//! so that someone who can write the backup target but has no key cannot roll it back or
//! swap it for an unprotected one unnoticed. The copies of one repository (the local one,
//! S3, a standby) share its id but lag behind each other: each is compared only with what
//! was seen at it.
//!
//! One small JSON file per repository id under `$BKIMG_STATE_DIR` (default
//! `/var/lib/bkimg/repositories` for root, else `$XDG_STATE_HOME/bkimg/repositories` or
//! `~/.local/state/bkimg/repositories`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bkimg_format::keys::Mode;
use bkimg_format::repo::Repository;
use bkimg_format::store::local::RepoConfig;
use bkimg_format::FormatError;
use serde::{Deserialize, Serialize};

use crate::cmd::key::Unlock;

#[derive(Serialize, Deserialize, Debug)]
struct Seen {
    repository_id: String,
    /// "encrypted" or "signed".
    protection: String,
    key_check: String,
    /// The largest sequence of any restore point seen anywhere, and that point's id.
    sequence: u64,
    point: String,
    /// The same at each location (a local repository's path, s3://..., bkimg://...).
    /// Absent from files written before copies were told apart: then every location is
    /// new.
    #[serde(default)]
    locations: BTreeMap<String, Newest>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Newest {
    sequence: u64,
    point: String,
}

/// The name a location is recorded under: a local path made absolute (so `./repo` and
/// `/srv/repo` are one), a URL as given.
fn location_key(location: &Path) -> String {
    let text = location.to_string_lossy();
    if text.contains("://") {
        return text.trim_end_matches('/').to_string();
    }
    std::fs::canonicalize(location)
        .unwrap_or_else(|_| location.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BKIMG_STATE_DIR") {
        return PathBuf::from(d).join("repositories");
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/bkimg/repositories");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("bkimg").join("repositories")
}

fn path(repository_id: &str) -> Option<PathBuf> {
    // Repository ids are UUIDs; anything else cannot name a file safely.
    repository_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        .then(|| dir().join(format!("{repository_id}.json")))
}

fn load(repository_id: &str) -> Result<Option<Seen>> {
    let Some(path) = path(repository_id) else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "reading {} (what this client saw of repository {repository_id}): remove it \
                 if it is damaged",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn store(seen: &Seen) -> Result<()> {
    let Some(path) = path(&seen.repository_id) else {
        return Ok(());
    };
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(seen)?)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

fn name(mode: Mode) -> &'static str {
    match mode {
        Mode::None => "none",
        Mode::Encrypted => "encrypted",
        Mode::Signed => "signed",
    }
}

/// Checks an opened local repository against what this client saw of it before, then
/// records what it shows now. `--accept-rollback` takes an older newest point (or a
/// repository no longer protected) as the new truth instead of refusing it. A repository
/// read `--unauthenticated` is neither checked nor recorded: its sequences could be forged.
pub fn check(
    location: &std::path::Path,
    config: &RepoConfig,
    repo: &Repository,
    unlock: &Unlock,
) -> Result<()> {
    if unlock.unauthenticated {
        return Ok(());
    }
    let accept_rollback = unlock.accept_rollback;
    let seen = load(&config.repository_id)?;
    if config.encryption.is_none() {
        if let (Some(seen), false) = (&seen, accept_rollback) {
            return Err(FormatError::Denied(format!(
                "{} was {} when this client last used it and is now unprotected: its config \
                 may have been replaced to make forged restore points readable. If you \
                 removed the protection yourself, add --accept-rollback once",
                location.display(),
                seen.protection
            ))
            .into());
        }
        if seen.is_some() {
            forget(&config.repository_id)?;
        }
        return Ok(());
    }
    let (points, bad) = repo.points()?;
    if !bad.is_empty() {
        // An unreadable manifest may be the newest point: the damage is what to report
        // (list, verify and "latest" name it), not a rollback; nothing is recorded.
        return Ok(());
    }
    let newest = points
        .iter()
        .filter_map(|p| p.manifest.sequence.map(|s| (s, p.manifest.id.clone())))
        .max();
    let (sequence, point) = newest.unwrap_or((0, String::new()));
    let here = location_key(location);
    let at_here = seen.as_ref().and_then(|s| s.locations.get(&here)).cloned();
    if let Some(seen) = &at_here {
        if sequence < seen.sequence && !accept_rollback {
            return Err(FormatError::Denied(format!(
                "{} was rolled back: its newest restore point is {} (sequence {sequence}), \
                 but this client has seen {} (sequence {}). Someone may have deleted newer \
                 restore points to make you restore an older state. If they were removed on \
                 purpose, add --accept-rollback once",
                location.display(),
                if point.is_empty() { "none" } else { &point },
                seen.point,
                seen.sequence
            ))
            .into());
        }
    }
    let newest = Newest { sequence, point };
    record(config, &here, newest, accept_rollback, seen)
}

/// Records `newest` as what was seen at `location` (and anywhere, when it is newer than
/// that), unless nothing changes.
fn record(
    config: &RepoConfig,
    location: &str,
    newest: Newest,
    replace: bool,
    seen: Option<Seen>,
) -> Result<()> {
    let enc = config
        .encryption
        .as_ref()
        .expect("only protected ones are recorded");
    let mut seen = match seen {
        Some(s) if s.key_check == enc.key_check && s.protection == name(enc.mode) => s,
        _ => Seen {
            repository_id: config.repository_id.clone(),
            protection: name(enc.mode).into(),
            key_check: enc.key_check.clone(),
            sequence: 0,
            point: String::new(),
            locations: BTreeMap::new(),
        },
    };
    let before = seen.locations.get(location);
    if before.is_some_and(|b| b.sequence >= newest.sequence && !replace) {
        return Ok(());
    }
    if before == Some(&newest) {
        return Ok(());
    }
    if newest.sequence > seen.sequence {
        seen.sequence = newest.sequence;
        seen.point = newest.point.clone();
    }
    seen.locations.insert(location.to_string(), newest);
    store(&seen)
}

/// Records a restore point this client has just written to the repository at `location`.
pub fn wrote(location: &Path, config: &RepoConfig, id: &str, sequence: Option<u64>) -> Result<()> {
    let (Some(_), Some(sequence)) = (&config.encryption, sequence) else {
        return Ok(());
    };
    let newest = Newest {
        sequence,
        point: id.into(),
    };
    let seen = load(&config.repository_id)?;
    record(config, &location_key(location), newest, false, seen)
}

fn forget(repository_id: &str) -> Result<()> {
    if let Some(path) = path(repository_id) {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}
