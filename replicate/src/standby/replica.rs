//! The warm standby disk: a device or image file kept equal to the latest restore point.
//!
//! State lives beside the repository, in `REPO/standby/`:
//! - `replica.json`: the target, the point last applied, and, while an apply runs, the
//!   point being applied (written durably before the first byte goes to the target);
//! - `apply.lock`: held (flock) while an apply runs, so status can tell "in progress" from
//!   "interrupted";
//! - `promoted`: present once `bkimg standby promote` ran; nothing is applied after it.
//!
//! An apply from point A to point B writes only the chunks whose digests differ between
//! A's and B's indexes (same layout), or restores B whole (first apply, other layout).
//! Redoing an interrupted apply from A to B is safe: it rewrites every chunk that differs,
//! and the rest is equal in A and B.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::manifest::{Content, Disk, PartitionTable};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::Digest;
use bkimg_restore::{gpt, RestoreRequest};
use serde::{Deserialize, Serialize};

use super::server::now_rfc3339;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub target: Option<String>,
    /// The point the target holds (complete and flushed).
    pub applied: Option<String>,
    /// Set before writing to the target, cleared after the flush.
    pub applying: Option<Applying>,
    pub last_apply: Option<ApplyReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applying {
    pub id: String,
    /// The point the target held when this apply began (None: whole restore).
    pub from: Option<String>,
    pub started: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApplyReport {
    pub id: String,
    pub from: Option<String>,
    /// "changed-chunks" or "full".
    pub mode: String,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub chunks_unchanged: u64,
    pub seconds: f64,
    pub finished: String,
}

impl ApplyReport {
    pub fn summary(&self) -> String {
        match self.mode.as_str() {
            "full" => format!(
                "applied {} (whole restore, {} bytes written) in {:.1} s",
                self.id, self.bytes_written, self.seconds
            ),
            _ => format!(
                "applied {} over {}: {} changed chunks written ({} bytes), {} unchanged, {:.1} s",
                self.id,
                self.from.as_deref().unwrap_or("-"),
                self.chunks_written,
                self.bytes_written,
                self.chunks_unchanged,
                self.seconds
            ),
        }
    }
}

pub struct Replica {
    repo: PathBuf,
    target: PathBuf,
}

pub fn state_dir(repo: &Path) -> PathBuf {
    repo.join("standby")
}

pub fn load_state(repo: &Path) -> Result<State> {
    let path = state_dir(repo).join("replica.json");
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is damaged: fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(anyhow::Error::from(e).context(format!("reading {}", path.display()))),
    }
}

fn save_state(repo: &Path, state: &State) -> Result<()> {
    let dir = state_dir(repo);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join("replica.json");
    let tmp = dir.join(".replica.json.tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(state).expect("serializes"))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Holds the apply lock until dropped.
pub struct ApplyLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

fn lock(repo: &Path, wait: bool) -> Result<Option<ApplyLock>> {
    let dir = state_dir(repo);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("apply.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let arg = if wait {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    };
    match nix::fcntl::Flock::lock(f, arg) {
        Ok(l) => Ok(Some(ApplyLock(l))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
        Err((_, e)) => Err(anyhow!("locking {}: {e}", path.display())),
    }
}

pub fn is_promoted(repo: &Path) -> bool {
    state_dir(repo).join("promoted").exists()
}

impl Replica {
    pub fn new(repo: &Path, target: &Path) -> Replica {
        Replica {
            repo: repo.to_path_buf(),
            target: target.to_path_buf(),
        }
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn is_promoted(&self) -> bool {
        is_promoted(&self.repo)
    }

    /// Finishes an apply that was interrupted (crash, kill, power loss). Promotion does not
    /// stop this: a half-applied replica is never left behind.
    pub fn finish_interrupted(&self) -> Result<Option<ApplyReport>> {
        let _l = lock(&self.repo, true)?;
        let state = load_state(&self.repo)?;
        let Some(a) = state.applying.clone() else {
            return Ok(None);
        };
        let target = state
            .target
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.target.clone());
        if target != self.target {
            // The target changed: the interrupted one is not ours to finish; start over.
            let mut s = state;
            s.applying = None;
            s.applied = None;
            s.target = Some(self.target.display().to_string());
            save_state(&self.repo, &s)?;
            return Ok(None);
        }
        apply(&self.repo, &self.target, &a.id, a.from.as_deref(), state).map(Some)
    }

    /// Brings the target to the latest restore point; None when it already holds it or
    /// when promoted.
    pub fn apply_latest(&self) -> Result<Option<ApplyReport>> {
        if let Some(r) = self.finish_interrupted()? {
            return Ok(Some(r));
        }
        let _l = lock(&self.repo, true)?;
        if self.is_promoted() {
            return Ok(None);
        }
        let mut state = load_state(&self.repo)?;
        if state.target.as_deref() != Some(&self.target.display().to_string()) {
            state.target = Some(self.target.display().to_string());
            state.applied = None;
        }
        let repo = Repository::open(&self.repo)?;
        let (points, _) = repo.points()?;
        let Some(latest) = points.last() else {
            return Ok(None);
        };
        if state.applied.as_deref() == Some(latest.manifest.id.as_str()) {
            return Ok(None);
        }
        let from = state.applied.clone();
        let id = latest.manifest.id.clone();
        apply(&self.repo, &self.target, &id, from.as_deref(), state).map(Some)
    }
}

/// Applies point `id` over `from` to `target`, recording the apply in the state first.
fn apply(
    repo_dir: &Path,
    target: &Path,
    id: &str,
    from: Option<&str>,
    mut state: State,
) -> Result<ApplyReport> {
    let start = Instant::now();
    let repo = Repository::open(repo_dir)?;
    let new = repo.point(id)?;
    let old = match from {
        Some(f) => repo.point(f).ok(),
        None => None,
    };
    state.target = Some(target.display().to_string());
    state.applying = Some(Applying {
        id: id.to_string(),
        from: from.map(str::to_owned),
        started: now_rfc3339(),
    });
    save_state(repo_dir, &state)?;
    let mut report = match old
        .as_ref()
        .filter(|o| same_layout(o, &new) && target.exists())
    {
        Some(old) => apply_changed(&repo, old, &new, target)?,
        None => apply_full(&repo, &new, target)?,
    };
    report.id = id.to_string();
    report.seconds = start.elapsed().as_secs_f64();
    report.finished = now_rfc3339();
    state.applied = Some(id.to_string());
    state.applying = None;
    state.last_apply = Some(report.clone());
    save_state(repo_dir, &state)?;
    Ok(report)
}

fn single_disk(p: &Point) -> Result<&Disk> {
    match p.manifest.disks.as_slice() {
        [d] => Ok(d),
        ds => bail!(
            "restore point {} has {} disks; a replica holds one disk: capture the disk to \
             replicate on its own",
            p.manifest.id,
            ds.len()
        ),
    }
}

fn same_layout(a: &Point, b: &Point) -> bool {
    let (Ok(da), Ok(db)) = (single_disk(a), single_disk(b)) else {
        return false;
    };
    a.manifest.chunk_size == b.manifest.chunk_size
        && da.size == db.size
        && da.logical_sector_size == db.logical_sector_size
        && da.table == db.table
        && da.volumes.len() == db.volumes.len()
        && da.volumes.iter().zip(&db.volumes).all(|(x, y)| {
            x.name == y.name
                && x.offset == y.offset
                && x.size == y.size
                && match (&x.content, &y.content) {
                    (Content::Data { .. }, Content::Data { .. }) => true,
                    (sx @ Content::Swap { .. }, sy @ Content::Swap { .. }) => sx == sy,
                    _ => false,
                }
        })
}

fn apply_full(repo: &Repository, new: &Point, target: &Path) -> Result<ApplyReport> {
    let disk = single_disk(new)?;
    let req = RestoreRequest {
        targets: vec![(disk.name.clone(), target.to_path_buf())],
        volume: None,
        workers: 2,
    };
    let r = bkimg_restore::restore(repo, new, &req, &bkimg_capture::progress::Silent)
        .with_context(|| {
            format!(
                "restoring {} to the replica {}",
                new.manifest.id,
                target.display()
            )
        })?;
    Ok(ApplyReport {
        mode: "full".into(),
        chunks_written: r.chunks_verified,
        bytes_written: r.bytes_written,
        ..Default::default()
    })
}

/// Writes the chunks whose digests differ between `old` and `new` (same layout).
fn apply_changed(
    repo: &Repository,
    old: &Point,
    new: &Point,
    target: &Path,
) -> Result<ApplyReport> {
    let disk = single_disk(new)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("opening the replica {}", target.display()))?;
    let meta = file.metadata()?;
    let size = if meta.file_type().is_block_device() {
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0))?
    } else {
        meta.len()
    };
    if size < disk.size {
        bail!(
            "the replica {} is {size} bytes, the restore point needs {}",
            target.display(),
            disk.size
        );
    }
    let mut report = ApplyReport {
        mode: "changed-chunks".into(),
        from: Some(old.manifest.id.clone()),
        ..Default::default()
    };
    let old_disk = single_disk(old)?;
    let cs = u64::from(new.manifest.chunk_size);
    let (mut blob, mut plain) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (vo, vn) in old_disk.volumes.iter().zip(&disk.volumes) {
        let (Content::Data { index: io, .. }, Content::Data { index: inew, .. }) =
            (&vo.content, &vn.content)
        else {
            continue; // equal swap headers (same_layout checked)
        };
        let (io, inew) = (
            Digest::from_hex(io).expect("validated"),
            Digest::from_hex(inew).expect("validated"),
        );
        let mut eo = repo.index(&io)?;
        let mut en = repo.index(&inew)?;
        let h = *en.header();
        let mut entry = 0u64;
        loop {
            en.next_batch(8192, &mut b)?;
            if b.is_empty() {
                break;
            }
            eo.next_batch(b.len(), &mut a)?;
            if a.len() != b.len() {
                bail!("indexes {io} and {inew} differ in length");
            }
            for (x, y) in a.iter().zip(&b) {
                let len = h.chunk_len(entry);
                let at = vn.offset + entry * cs;
                entry += 1;
                if x == y {
                    report.chunks_unchanged += 1;
                    continue;
                }
                if y.is_hole() {
                    plain.clear();
                    plain.resize(len as usize, 0);
                } else {
                    repo.chunk(y, &mut blob, &mut plain)?;
                    if plain.len() != len as usize {
                        bail!("chunk {y} is {} bytes, the index needs {len}", plain.len());
                    }
                }
                file.write_all_at(&plain, at)
                    .with_context(|| format!("writing {} at byte {at}", target.display()))?;
                report.chunks_written += 1;
                report.bytes_written += u64::from(len);
                if report.chunks_written == 1 {
                    test_pause();
                }
            }
        }
    }
    write_gpt(disk, &file, size)?;
    file.sync_all()
        .with_context(|| format!("flushing {}", target.display()))?;
    Ok(report)
}

/// End-to-end tests stop the standby half-way through an apply: this widens the window
/// (after the first changed chunk is written) when BKIMG_TEST_APPLY_PAUSE_MS is set.
fn test_pause() {
    if let Some(ms) = std::env::var("BKIMG_TEST_APPLY_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Rewrites a GPT the way restore does (backup at the target's end), so a replica larger
/// than the source disk keeps a valid table.
fn write_gpt(disk: &Disk, file: &File, size: u64) -> Result<()> {
    let PartitionTable::Gpt(table) = &disk.table else {
        return Ok(());
    };
    let ss = disk.logical_sector_size;
    if size != disk.size {
        let mut lba0 = vec![0u8; 512];
        file.read_exact_at(&mut lba0, 0)?;
        gpt::patch_protective_mbr(&mut lba0, size, ss);
        file.write_all_at(&vec![0u8; ss as usize], disk.size - u64::from(ss))?;
        file.write_all_at(&lba0, 0)?;
    }
    for (offset, bytes) in gpt::encode(table, size, ss, disk.size)?.writes {
        file.write_all_at(&bytes, offset)
            .context("writing the GPT")?;
    }
    Ok(())
}

/// What `bkimg standby status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub repo: String,
    pub points: Vec<String>,
    pub latest: Option<String>,
    pub replica: Option<String>,
    pub applied: Option<String>,
    /// "idle", "in progress" or "interrupted".
    pub apply_state: String,
    pub applying: Option<Applying>,
    pub promoted: bool,
    pub last_apply: Option<ApplyReport>,
}

pub fn status(repo_dir: &Path) -> Result<Status> {
    let repo = Repository::open(repo_dir)?;
    let (points, _) = repo.points()?;
    let state = load_state(repo_dir)?;
    let apply_state = match &state.applying {
        None => "idle",
        Some(_) if lock(repo_dir, false)?.is_some() => "interrupted",
        Some(_) => "in progress",
    };
    Ok(Status {
        repo: repo_dir.display().to_string(),
        latest: points.last().map(|p| p.manifest.id.clone()),
        points: points.into_iter().map(|p| p.manifest.id).collect(),
        replica: state.target.clone(),
        applied: state.applied.clone(),
        apply_state: apply_state.into(),
        applying: state.applying.clone(),
        promoted: is_promoted(repo_dir),
        last_apply: state.last_apply,
    })
}

/// Stops applying for good (a running server notices within seconds), finishes an
/// interrupted apply, and reports what the replica holds.
pub fn promote(repo_dir: &Path) -> Result<Status> {
    Repository::open(repo_dir)?;
    let dir = state_dir(repo_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = dir.join("promoted");
    if !marker.exists() {
        let mut f =
            File::create(&marker).with_context(|| format!("creating {}", marker.display()))?;
        writeln!(f, "promoted {}", now_rfc3339())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", marker.display()))?;
        File::open(&dir).and_then(|d| d.sync_all()).ok();
    }
    // Waits for a running apply to end; finishes an interrupted one.
    let state = load_state(repo_dir)?;
    if let Some(t) = &state.target {
        Replica::new(repo_dir, Path::new(t)).finish_interrupted()?;
    }
    status(repo_dir)
}
