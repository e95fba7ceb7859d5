//! The warm standby disks: devices or image files kept equal to the latest restore point,
//! one replica per disk of the point (`--replica TARGET` for single-disk points,
//! `--replica DISK=TARGET` for each disk of a whole machine).
//!
//! State lives beside the repository, in `REPO/standby/`:
//! - `replica.json`: the journal ([`State`]): the replicas, the point each holds and what
//!   was written to it ([`Written`]: the target's identity and a sample of its chunks),
//!   and, while an apply runs, the point being applied and which disks are done. It is
//!   written durably before the first byte goes to a target and again after each disk is
//!   flushed;
//! - `apply.lock`: held (flock) while an apply runs, so status can tell "in progress" from
//!   "interrupted";
//! - `promoted`: present once `bkimg standby promote` ran; nothing is applied until
//!   `bkimg standby demote` removes it.
//!
//! An apply from point A to point B writes, per disk, only the chunks whose digests differ
//! between A's and B's indexes (same layout), or restores that disk of B whole (first
//! apply, other layout, or a target that is not the device written or whose sampled
//! chunks changed since: [`written::changed`]). Redoing an interrupted apply from A to B is safe: it rewrites
//! every chunk that differs, and the rest is equal in A and B. A point is applied to all
//! replicas or to none: one whose disks do not match the replicas is recorded as
//! `not_applied` and left alone.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::manifest::{Content, Disk, PartitionTable};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::{LocalDir, StoreRead};
use bkimg_format::Digest;
use bkimg_restore::{gpt, RestoreRequest};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use bkimg_format::time::now_rfc3339;

use super::server::log;
use super::written::{self, Written};

/// Journal layout written by this version. Journals without `version` (one replica, a
/// `target` field) are migrated when read. Version 3 added what the standby wrote to each
/// replica ([`ReplicaState::written`]); a replica of an earlier journal has none, so its
/// next apply restores it whole (see [`written::changed`]).
const JOURNAL_VERSION: u32 = 3;

/// A replica as configured: `--replica TARGET` (disk None: the only disk of single-disk
/// restore points) or `--replica DISK=TARGET` (the disk `bkimg info` calls DISK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub disk: Option<String>,
    pub target: PathBuf,
}

impl ReplicaSpec {
    /// Parses the `--replica` arguments: either one `TARGET`, or `DISK=TARGET` for each
    /// disk. A `DISK` holds no '/', so a path with '=' in it is written with a directory
    /// (`./a=b.img`).
    pub fn parse_all(args: &[String]) -> Result<Vec<ReplicaSpec>> {
        let mut out: Vec<ReplicaSpec> = Vec::new();
        for a in args {
            let spec = match a.split_once('=') {
                Some((d, t)) if !d.is_empty() && !d.contains('/') => {
                    if t.is_empty() {
                        bail!("--replica {a}: no target after '=': give --replica DISK=TARGET");
                    }
                    ReplicaSpec {
                        disk: Some(d.to_string()),
                        target: PathBuf::from(t),
                    }
                }
                _ if a.is_empty() => bail!("--replica needs a TARGET or DISK=TARGET"),
                _ => ReplicaSpec {
                    disk: None,
                    target: PathBuf::from(a),
                },
            };
            if let Some(d) = &spec.disk {
                if out.iter().any(|s| s.disk.as_ref() == Some(d)) {
                    bail!("disk {d} is named by more than one --replica");
                }
            }
            let id = bkimg_restore::target::identity(&spec.target);
            if out.iter().any(|s| {
                s.target == spec.target
                    || (id.is_some() && bkimg_restore::target::identity(&s.target) == id)
            }) {
                bail!(
                    "{} is given as the replica of more than one disk: each disk needs its own \
                     target",
                    spec.target.display()
                );
            }
            out.push(spec);
        }
        if out.len() > 1 && out.iter().any(|s| s.disk.is_none()) {
            bail!(
                "--replica TARGET without a disk name is for single-disk restore points and is \
                 given once; for several disks give --replica DISK=TARGET for each (disk names \
                 as `bkimg info` shows them: disk0, disk1, ... in the order of capture's SOURCEs)"
            );
        }
        Ok(out)
    }

    fn key(&self) -> (Option<String>, String) {
        (self.disk.clone(), self.target.display().to_string())
    }
}

/// The journal, `REPO/standby/replica.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// [`JOURNAL_VERSION`]; absent in journals of one replica (migrated on load).
    #[serde(default)]
    pub version: u32,
    /// The replicas as last configured, each with the point it holds.
    #[serde(default)]
    pub replicas: Vec<ReplicaState>,
    /// The point last applied to every replica (complete and flushed); while an apply
    /// runs, the one it started from.
    pub applied: Option<String>,
    /// Set before writing to any target, cleared after the last one is flushed.
    pub applying: Option<Applying>,
    pub last_apply: Option<ApplyReport>,
    /// The latest restore point, when its disks do not match the replicas.
    #[serde(default)]
    pub not_applied: Option<NotApplied>,
    /// Journals before version 2: the one target (moved into `replicas` on load).
    #[serde(default, skip_serializing)]
    target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The disk of the restore point (None: the only disk of single-disk points).
    pub disk: Option<String>,
    pub target: String,
    /// The point this target holds, complete and flushed (None: nothing known, so the
    /// next apply restores it whole).
    pub holds: Option<String>,
    /// The target's identity and a sample of its chunks, taken after the apply of `holds`
    /// was flushed; checked before the next incremental apply (None: journals before
    /// version 3, or nothing applied: the next apply restores it whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<Written>,
}

impl ReplicaState {
    pub fn label(&self) -> String {
        match &self.disk {
            Some(d) => format!("{d}={}", self.target),
            None => self.target.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applying {
    pub id: String,
    /// The point all targets held when this apply began (None: not all the same).
    pub from: Option<String>,
    pub started: String,
    /// One entry per replica; `done` once that target is flushed. Empty only in journals
    /// before version 2 (migrated on load).
    #[serde(default)]
    pub disks: Vec<DiskApplying>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskApplying {
    pub disk: Option<String>,
    pub target: String,
    /// The point this target held when the apply began (None: whole restore).
    pub from: Option<String>,
    pub done: bool,
    /// Why this target is restored whole although it held a point of the same layout
    /// (it changed behind the standby's back, or it is another device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_because: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotApplied {
    pub id: String,
    /// The disks of that restore point.
    pub disks: Vec<String>,
    pub reason: String,
    pub since: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApplyReport {
    pub id: String,
    pub from: Option<String>,
    /// "changed-chunks" or "full"; "mixed" when the disks were applied differently.
    pub mode: String,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub chunks_unchanged: u64,
    pub seconds: f64,
    pub finished: String,
    /// Per disk (absent in journals before version 2).
    #[serde(default)]
    pub disks: Vec<DiskReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskReport {
    pub disk: String,
    pub target: String,
    pub from: Option<String>,
    pub mode: String,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub chunks_unchanged: u64,
    /// As [`DiskApplying::whole_because`]: why this disk was restored whole instead of
    /// having the changed chunks applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_because: Option<String>,
}

impl DiskReport {
    fn summary(&self) -> String {
        match self.mode.as_str() {
            "full" => format!("whole restore, {} bytes written", self.bytes_written),
            _ => format!(
                "{} changed chunks written ({} bytes), {} unchanged",
                self.chunks_written, self.bytes_written, self.chunks_unchanged
            ),
        }
    }
}

impl ApplyReport {
    pub fn summary(&self) -> String {
        if self.disks.len() > 1 {
            let each: Vec<String> = self
                .disks
                .iter()
                .map(|d| format!("{} {}: {}", d.disk, d.target, d.summary()))
                .collect();
            return format!(
                "applied {} to {} disks in {:.1} s: {}",
                self.id,
                self.disks.len(),
                self.seconds,
                each.join("; ")
            );
        }
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

/// What [`Replica::apply_latest`] did.
#[derive(Debug)]
pub enum Outcome {
    Applied(ApplyReport),
    /// The replicas hold the latest point already (or there is none).
    UpToDate,
    Promoted,
    /// The latest point's disks do not match the replicas; nothing was written.
    NotApplied(NotApplied),
}

pub struct Replica {
    repo: PathBuf,
    specs: Vec<ReplicaSpec>,
    open: Opener,
}

/// How the standby's repository is opened to read the points applied: a protected one
/// (encrypted or signed) through its key, which the standby was given.
pub type Opener = Arc<dyn Fn(&Path) -> Result<Repository> + Send + Sync>;

/// Opens an unprotected repository (a protected one is refused, naming what it needs).
pub fn plain_opener() -> Opener {
    Arc::new(|dir: &Path| Ok(Repository::open(dir)?))
}

/// The ids of the restore points in `repo_dir`, oldest first, read from their names: what
/// the status shows, without the key a protected repository's manifests need.
fn point_ids(repo_dir: &Path) -> Result<Vec<String>> {
    let (store, _) = LocalDir::open_any(repo_dir)?;
    let mut ids = store.list_manifests()?;
    ids.sort();
    Ok(ids)
}

pub fn state_dir(repo: &Path) -> PathBuf {
    repo.join("standby")
}

pub fn load_state(repo: &Path) -> Result<State> {
    let path = state_dir(repo).join("replica.json");
    let state: State = match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is damaged: fix or remove it", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => return Err(anyhow::Error::from(e).context(format!("reading {}", path.display()))),
    };
    if state.version > JOURNAL_VERSION {
        bail!(
            "{} has journal version {}, possibly written by a newer bkimg: use that version",
            path.display(),
            state.version
        );
    }
    Ok(migrate(state))
}

/// Brings a journal of one replica (before version 2) to the current layout.
fn migrate(mut s: State) -> State {
    if let Some(t) = s.target.take() {
        if s.replicas.is_empty() {
            s.replicas.push(ReplicaState {
                disk: None,
                target: t.clone(),
                holds: s.applied.clone(),
                written: None,
            });
        }
        if let Some(a) = &mut s.applying {
            if a.disks.is_empty() {
                a.disks.push(DiskApplying {
                    disk: None,
                    target: t,
                    from: a.from.clone(),
                    done: false,
                    whole_because: None,
                });
            }
        }
    }
    s.version = JOURNAL_VERSION;
    s
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
    sync_dir(&dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
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

fn marker(repo: &Path) -> PathBuf {
    state_dir(repo).join("promoted")
}

pub fn is_promoted(repo: &Path) -> bool {
    marker(repo).exists()
}

/// The point every replica holds, if they all hold the same one.
fn common_holds(replicas: &[ReplicaState]) -> Option<String> {
    let first = replicas.first()?.holds.clone()?;
    replicas
        .iter()
        .all(|r| r.holds.as_deref() == Some(first.as_str()))
        .then_some(first)
}

/// Makes the journal describe `specs`; true if it changed. A replica keeps what it holds
/// only if the same disk goes to the same target as before. An interrupted apply to
/// other replicas is dropped, and the targets it had begun to write restore whole next.
fn configure(state: &mut State, specs: &[ReplicaSpec]) -> bool {
    let mut wanted: Vec<_> = specs.iter().map(ReplicaSpec::key).collect();
    let mut have: Vec<_> = state
        .replicas
        .iter()
        .map(|r| (r.disk.clone(), r.target.clone()))
        .collect();
    wanted.sort();
    have.sort();
    if wanted == have {
        return false;
    }
    let mut half_written = Vec::new();
    if let Some(a) = &state.applying {
        let mut keys: Vec<_> = a
            .disks
            .iter()
            .map(|d| (d.disk.clone(), d.target.clone()))
            .collect();
        keys.sort();
        if keys != wanted {
            half_written.extend(a.disks.iter().filter(|d| !d.done).map(|d| d.target.clone()));
            state.applying = None;
        }
    }
    let old = std::mem::take(&mut state.replicas);
    state.replicas = specs
        .iter()
        .map(|s| {
            let (disk, target) = s.key();
            let kept = old
                .iter()
                .find(|r| r.disk == disk && r.target == target)
                .filter(|_| !half_written.contains(&target));
            ReplicaState {
                disk,
                target,
                holds: kept.and_then(|r| r.holds.clone()),
                written: kept.and_then(|r| r.written.clone()),
            }
        })
        .collect();
    state.applied = common_holds(&state.replicas);
    true
}

/// The disk of `p` that replica `disk` holds (None: the only one).
fn disk_of<'a>(p: &'a Point, disk: Option<&str>) -> Result<&'a Disk> {
    let ds = &p.manifest.disks;
    match disk {
        Some(name) => ds.iter().find(|d| d.name == name).ok_or_else(|| {
            anyhow!(
                "restore point {} has no disk {name} (it has {})",
                p.manifest.id,
                disk_names(p).join(", ")
            )
        }),
        None => match ds.as_slice() {
            [d] => Ok(d),
            _ => bail!(
                "restore point {} has {} disks: give --replica DISK=TARGET for each",
                p.manifest.id,
                ds.len()
            ),
        },
    }
}

fn disk_names(p: &Point) -> Vec<String> {
    p.manifest.disks.iter().map(|d| d.name.clone()).collect()
}

/// Whether `p` can be applied to `specs` as a whole: the reason if not.
fn check_disks(p: &Point, specs: &[ReplicaSpec]) -> std::result::Result<(), String> {
    let mut have = disk_names(p);
    have.sort();
    let id = &p.manifest.id;
    if let [ReplicaSpec { disk: None, .. }] = specs {
        return match have.len() {
            1 => Ok(()),
            n => Err(format!(
                "restore point {id} has {n} disks ({}) but the standby has one replica \
                 (--replica TARGET, for single-disk points): not applied; run serve with \
                 --replica DISK=TARGET for each disk",
                have.join(", ")
            )),
        };
    }
    let mut want: Vec<String> = specs.iter().filter_map(|s| s.disk.clone()).collect();
    want.sort();
    if want == have {
        return Ok(());
    }
    Err(format!(
        "restore point {id} has disks {} but the replicas are for disks {}: not applied \
         (the replicas keep what they hold); capture all these disks together in one point, \
         or run serve with --replica DISK=TARGET for each disk of the point",
        have.join(", "),
        want.join(", ")
    ))
}

impl Replica {
    /// `specs` as [`ReplicaSpec::parse_all`] returns them (at least one).
    pub fn new(repo: &Path, specs: Vec<ReplicaSpec>) -> Result<Replica> {
        if specs.is_empty() {
            bail!("no replica given");
        }
        Ok(Replica {
            repo: repo.to_path_buf(),
            specs,
            open: plain_opener(),
        })
    }

    /// Reads the standby's repository with `open` (a protected one through its key).
    pub fn with_opener(mut self, open: Opener) -> Replica {
        self.open = open;
        self
    }

    /// The targets, as the user named them ("/dev/sdb" or "disk0=/dev/sdb, disk1=...").
    pub fn describe(&self) -> String {
        self.specs
            .iter()
            .map(|s| match &s.disk {
                Some(d) => format!("{d}={}", s.target.display()),
                None => s.target.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_promoted(&self) -> bool {
        is_promoted(&self.repo)
    }

    /// Records the configured replicas in the journal and finishes an apply that was
    /// interrupted (crash, kill, power loss). Promotion does not stop this: a
    /// half-applied replica is never left behind.
    pub fn finish_interrupted(&self) -> Result<Option<ApplyReport>> {
        let _l = lock(&self.repo, true)?;
        let mut state = load_state(&self.repo)?;
        if configure(&mut state, &self.specs) {
            save_state(&self.repo, &state)?;
        }
        finish(&self.repo, &mut state, &self.open)
    }

    /// Brings every replica to the latest restore point, or none of them if its disks do
    /// not match the replicas.
    pub fn apply_latest(&self) -> Result<Outcome> {
        if let Some(r) = self.finish_interrupted()? {
            return Ok(Outcome::Applied(r));
        }
        let _l = lock(&self.repo, true)?;
        if self.is_promoted() {
            return Ok(Outcome::Promoted);
        }
        let mut state = load_state(&self.repo)?;
        let mut dirty = configure(&mut state, &self.specs);
        let repo = (self.open)(&self.repo)?;
        let (points, _) = repo.points()?;
        let Some(latest) = points.last() else {
            if dirty {
                save_state(&self.repo, &state)?;
            }
            return Ok(Outcome::UpToDate);
        };
        let id = latest.manifest.id.clone();
        if state.replicas.iter().all(|r| r.holds.as_ref() == Some(&id)) {
            dirty |= state.not_applied.take().is_some();
            if dirty {
                save_state(&self.repo, &state)?;
            }
            return Ok(Outcome::UpToDate);
        }
        if let Err(reason) = check_disks(latest, &self.specs) {
            if state.not_applied.as_ref().map(|n| &n.id) != Some(&id) {
                state.not_applied = Some(NotApplied {
                    id: id.clone(),
                    disks: disk_names(latest),
                    reason,
                    since: now_rfc3339(),
                });
                dirty = true;
            }
            if dirty {
                save_state(&self.repo, &state)?;
            }
            return Ok(Outcome::NotApplied(
                state.not_applied.clone().expect("just set"),
            ));
        }
        state.not_applied = None;
        state.applying = Some(Applying {
            id: id.clone(),
            from: state.applied.clone(),
            started: now_rfc3339(),
            disks: state
                .replicas
                .iter()
                .map(|r| DiskApplying {
                    disk: r.disk.clone(),
                    target: r.target.clone(),
                    from: r.holds.clone(),
                    done: r.holds.as_ref() == Some(&id),
                    whole_because: None,
                })
                .collect(),
        });
        // Durable before the first byte goes to a target.
        save_state(&self.repo, &state)?;
        run(&self.repo, &mut state, &self.open).map(Outcome::Applied)
    }
}

/// Runs the apply the journal records, if any, to its end (the caller holds the lock).
fn finish(repo_dir: &Path, state: &mut State, open: &Opener) -> Result<Option<ApplyReport>> {
    if state.applying.is_none() {
        return Ok(None);
    }
    run(repo_dir, state, open).map(Some)
}

/// Applies `state.applying` (already durable) to each of its targets not done yet,
/// recording each target as done once it is flushed.
fn run(repo_dir: &Path, state: &mut State, open: &Opener) -> Result<ApplyReport> {
    let start = Instant::now();
    let a = state.applying.clone().expect("an apply is recorded");
    let repo = open(repo_dir)?;
    let new = repo.point(&a.id)?;
    let mut report = ApplyReport {
        id: a.id.clone(),
        from: a.from.clone(),
        ..Default::default()
    };
    for (i, d) in a.disks.iter().enumerate() {
        if d.done {
            continue;
        }
        let disk = disk_of(&new, d.disk.as_deref())?;
        let target = Path::new(&d.target);
        let old = d.from.as_deref().and_then(|f| repo.point(f).ok());
        let old_disk = old.as_ref().and_then(|o| {
            disk_of(o, d.disk.as_deref())
                .ok()
                .filter(|od| same_layout(o, od, &new, disk))
        });
        // The changed chunks go only onto the device the standby wrote, still holding what
        // it wrote (as far as the sample shows); otherwise the disk is restored whole.
        let distrust = match (old_disk, d.from.as_deref()) {
            (Some(_), Some(from)) if d.whole_because.is_none() => {
                if !target.exists() {
                    Some("it does not exist any more".to_string())
                } else {
                    let w = state
                        .replicas
                        .iter()
                        .find(|rs| rs.target == d.target)
                        .and_then(|rs| rs.written.as_ref());
                    written::changed(&repo, w, from, &new, disk, target)?
                }
            }
            _ => None,
        };
        if let (Some(why), Some(from)) = (&distrust, &d.from) {
            log(&format!(
                "replica {}: {why}: restoring {} to it whole instead of applying the \
                 changes since {from}",
                d.target, a.id
            ));
            // Durable before writing: a restart restores this disk whole too.
            if let Some(x) = state.applying.as_mut() {
                x.disks[i].from = None;
                x.disks[i].whole_because = Some(why.clone());
            }
            if let Some(rs) = state.replicas.iter_mut().find(|rs| rs.target == d.target) {
                rs.holds = None;
                rs.written = None;
            }
            save_state(repo_dir, state)?;
        }
        let mut r = match old_disk {
            Some(od) if distrust.is_none() && d.whole_because.is_none() && target.exists() => {
                apply_changed(&repo, &new, od, disk, target)?
            }
            _ => apply_full(&repo, &new, disk, target)?,
        };
        r.disk = disk.name.clone();
        r.target = d.target.clone();
        if r.mode != "full" {
            r.from = d.from.clone();
        } else {
            r.whole_because = distrust.or_else(|| d.whole_because.clone());
        }
        let w = written::take(&new, disk, target).with_context(|| {
            format!("sampling the replica {} after the apply", target.display())
        })?;
        if let Some(x) = state.applying.as_mut() {
            x.disks[i].done = true;
        }
        if let Some(rs) = state.replicas.iter_mut().find(|rs| rs.target == d.target) {
            rs.holds = Some(a.id.clone());
            rs.written = Some(w);
        }
        save_state(repo_dir, state)?;
        report.chunks_written += r.chunks_written;
        report.bytes_written += r.bytes_written;
        report.chunks_unchanged += r.chunks_unchanged;
        report.disks.push(r);
    }
    let first = report.disks.first().map(|d| d.mode.clone());
    report.mode = match first {
        Some(m) if report.disks.iter().all(|d| d.mode == m) => m,
        Some(_) => "mixed".into(),
        None => "changed-chunks".into(),
    };
    report.seconds = start.elapsed().as_secs_f64();
    report.finished = now_rfc3339();
    state.applying = None;
    state.applied = common_holds(&state.replicas);
    state.last_apply = Some(report.clone());
    save_state(repo_dir, state)?;
    Ok(report)
}

fn same_layout(a: &Point, da: &Disk, b: &Point, db: &Disk) -> bool {
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

fn apply_full(repo: &Repository, new: &Point, disk: &Disk, target: &Path) -> Result<DiskReport> {
    let req = RestoreRequest {
        targets: vec![(disk.name.clone(), target.to_path_buf())],
        volume: None,
        workers: 2,
    };
    let r = bkimg_restore::restore(repo, new, &req, &bkimg_format::progress::Silent).with_context(
        || {
            format!(
                "restoring {} of {} to the replica {}",
                disk.name,
                new.manifest.id,
                target.display()
            )
        },
    )?;
    Ok(DiskReport {
        mode: "full".into(),
        chunks_written: r.chunks_verified,
        bytes_written: r.bytes_written,
        ..Default::default()
    })
}

/// Writes the chunks of `disk` whose digests differ from `old_disk`'s (same layout).
fn apply_changed(
    repo: &Repository,
    new: &Point,
    old_disk: &Disk,
    disk: &Disk,
    target: &Path,
) -> Result<DiskReport> {
    // The checks a restore makes of its target: the right kind, large enough, the
    // sector size, not mounted or held (opened exclusively), not a file under a loop
    // device. Someone may have mounted the replica since the last apply.
    let opened = bkimg_restore::target::Target::open(
        target,
        disk.size,
        None,
        Some(disk.logical_sector_size),
    )
    .with_context(|| format!("the replica of {}", disk.name))?;
    let file = &opened.file;
    let mut report = DiskReport {
        mode: "changed-chunks".into(),
        ..Default::default()
    };
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
                    // Tests stop the standby here, half-way through an apply.
                    bkimg_format::testhook::pause("apply-first-chunk");
                }
            }
        }
    }
    write_gpt(disk, file, opened.size)?;
    file.sync_all()
        .with_context(|| format!("flushing {}", target.display()))?;
    Ok(report)
}

/// Rewrites a GPT the way restore does (backup at the target's end), so a replica larger
/// than the source disk keeps a valid table. Sectors that hold the right bytes already
/// are not written: a disk whose chunks did not change is not written at all.
fn write_gpt(disk: &Disk, file: &File, size: u64) -> Result<()> {
    let PartitionTable::Gpt(table) = &disk.table else {
        return Ok(());
    };
    let ss = disk.logical_sector_size;
    let mut writes = Vec::new();
    if size != disk.size {
        let mut lba0 = vec![0u8; 512];
        file.read_exact_at(&mut lba0, 0)?;
        gpt::patch_protective_mbr(&mut lba0, size, ss);
        writes.push((disk.size - u64::from(ss), vec![0u8; ss as usize]));
        writes.push((0, lba0));
    }
    writes.extend(gpt::encode(table, size, ss, disk.size)?.writes);
    let mut have = Vec::new();
    for (offset, bytes) in writes {
        have.resize(bytes.len(), 0);
        if file.read_exact_at(&mut have, offset).is_ok() && have == bytes {
            continue;
        }
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
    /// The replica targets in one line: the path, or "DISK=PATH, ..." for several.
    pub replica: Option<String>,
    pub replicas: Vec<ReplicaState>,
    pub applied: Option<String>,
    /// "idle", "in progress" or "interrupted".
    pub apply_state: String,
    pub applying: Option<Applying>,
    pub promoted: bool,
    /// When `promote` ran (None when not promoted).
    pub promoted_at: Option<String>,
    pub not_applied: Option<NotApplied>,
    pub last_apply: Option<ApplyReport>,
}

/// One replica compared with the restore point its journal says it holds.
#[derive(Debug, Serialize)]
pub struct ReplicaCheck {
    pub target: String,
    /// The point compared against (None: the journal knows of none yet).
    pub point: Option<String>,
    pub disk: Option<String>,
    pub chunks_checked: u64,
    /// Where the replica differs: volume and byte offset within it, at most 20 listed.
    pub differences: Vec<String>,
    /// How many differ in all.
    pub differing_chunks: u64,
}

/// Reads every replica and compares each chunk with the digest its restore point records
/// (holes must read as zeros), holding the apply lock. Swap volumes are skipped (restore
/// writes a fresh header), and so are gaps when the replica is larger than the disk (the
/// partition table there is rewritten for the larger size).
pub fn verify_replicas(repo_dir: &Path, open: &Opener) -> Result<Vec<ReplicaCheck>> {
    // No apply runs meanwhile (it would show as differences).
    let _l = lock(repo_dir, true)?;
    let state = load_state(repo_dir)?;
    let repo = open(repo_dir)?;
    let ids = repo.chunk_ids();
    let mut out = Vec::new();
    for r in &state.replicas {
        let mut check = ReplicaCheck {
            target: r.target.clone(),
            point: r.holds.clone(),
            disk: r.disk.clone(),
            chunks_checked: 0,
            differences: Vec::new(),
            differing_chunks: 0,
        };
        let Some(id) = &r.holds else {
            out.push(check);
            continue;
        };
        let point = repo.resolve(id)?;
        let disk = match &r.disk {
            Some(name) => point.manifest.disks.iter().find(|d| &d.name == name),
            None => point.manifest.disks.first(),
        }
        .ok_or_else(|| anyhow::anyhow!("restore point {id} has no disk for {}", r.label()))?;
        check.disk = Some(disk.name.clone());
        let file =
            File::open(&r.target).with_context(|| format!("opening the replica {}", r.target))?;
        let size = {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0))?
        };
        let cs = u64::from(point.manifest.chunk_size);
        let mut buf = vec![0u8; cs as usize];
        let mut batch = Vec::new();
        for v in &disk.volumes {
            let Content::Data { index, .. } = &v.content else {
                continue;
            };
            if v.role == bkimg_format::manifest::VolumeRole::Gap && size != disk.size {
                continue;
            }
            let index = Digest::from_hex(index).expect("validated");
            let mut entries = repo.index(&index)?;
            let mut n = 0u64;
            loop {
                entries.next_batch(4096, &mut batch)?;
                if batch.is_empty() {
                    break;
                }
                for d in &batch {
                    let at = n * cs;
                    let len = cs.min(v.size - at) as usize;
                    file.read_exact_at(&mut buf[..len], v.offset + at)
                        .with_context(|| format!("reading the replica {}", r.target))?;
                    let same = ids.of(&buf[..len]) == *d;
                    check.chunks_checked += 1;
                    if !same {
                        check.differing_chunks += 1;
                        if check.differences.len() < 20 {
                            check
                                .differences
                                .push(format!("{} {} at byte {at}", disk.name, v.name));
                        }
                    }
                    n += 1;
                }
            }
        }
        out.push(check);
    }
    Ok(out)
}

pub fn status(repo_dir: &Path) -> Result<Status> {
    let points = point_ids(repo_dir)?;
    let state = load_state(repo_dir)?;
    let apply_state = match &state.applying {
        None => "idle",
        Some(_) if lock(repo_dir, false)?.is_some() => "interrupted",
        Some(_) => "in progress",
    };
    let promoted_at = fs::read_to_string(marker(repo_dir)).ok().map(|t| {
        t.trim()
            .strip_prefix("promoted ")
            .unwrap_or(t.trim())
            .to_string()
    });
    Ok(Status {
        repo: repo_dir.display().to_string(),
        latest: points.last().cloned(),
        points,
        replica: (!state.replicas.is_empty()).then(|| {
            state
                .replicas
                .iter()
                .map(ReplicaState::label)
                .collect::<Vec<_>>()
                .join(", ")
        }),
        replicas: state.replicas.clone(),
        applied: state.applied.clone(),
        apply_state: apply_state.into(),
        applying: state.applying.clone(),
        promoted: promoted_at.is_some() || is_promoted(repo_dir),
        promoted_at,
        not_applied: state.not_applied,
        last_apply: state.last_apply,
    })
}

/// Stops applying (a running server notices within seconds), finishes an interrupted
/// apply, and reports what the replicas hold.
pub fn promote(repo_dir: &Path, open: &Opener) -> Result<Status> {
    LocalDir::open_any(repo_dir)?;
    let dir = state_dir(repo_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = marker(repo_dir);
    if !marker.exists() {
        let mut f =
            File::create(&marker).with_context(|| format!("creating {}", marker.display()))?;
        writeln!(f, "promoted {}", now_rfc3339())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", marker.display()))?;
        sync_dir(&dir).ok();
    }
    // Waits for a running apply to end; finishes an interrupted one.
    {
        let _l = lock(repo_dir, true)?;
        let mut state = load_state(repo_dir)?;
        finish(repo_dir, &mut state, open)?;
    }
    status(repo_dir)
}

/// Undoes [`promote`]: the replicas go back to standby duty. They may have been booted
/// and written since, so none is trusted: the next apply (a running server starts it
/// within seconds) restores the latest point to each whole. False when not promoted
/// (nothing is changed).
pub fn demote(repo_dir: &Path) -> Result<bool> {
    LocalDir::open_any(repo_dir)?;
    let marker = marker(repo_dir);
    let _l = lock(repo_dir, true)?;
    if !marker.exists() {
        return Ok(false);
    }
    let mut state = load_state(repo_dir)?;
    for r in &mut state.replicas {
        r.holds = None;
        r.written = None;
    }
    state.applied = None;
    state.applying = None;
    save_state(repo_dir, &state)?;
    fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    sync_dir(&state_dir(repo_dir))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkimg_capture::CaptureOptions;
    use bkimg_format::store::LocalDir;

    const CS: usize = 64 << 10;

    /// Bytes no compressor shrinks, different per seed.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    struct Fx {
        dir: tempfile::TempDir,
        repo: PathBuf,
    }

    impl Fx {
        fn new() -> Fx {
            let dir = tempfile::tempdir().unwrap();
            let repo = dir.path().join("repo");
            LocalDir::open_or_create(&repo, "r", "2026-01-01T00:00:00Z").unwrap();
            Fx { dir, repo }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// An image file of `chunks` chunks of noise.
        fn image(&self, name: &str, chunks: usize, seed: u64) -> PathBuf {
            let p = self.path(name);
            fs::write(&p, noise(chunks * CS, seed)).unwrap();
            p
        }

        /// Captures `sources` (one disk each, raw) as point `n`, child of `n - 1`.
        fn capture(&self, n: u32, sources: &[&Path]) -> String {
            let store = LocalDir::open(&self.repo).unwrap();
            let repo = Repository::open(&self.repo).unwrap();
            let parent = (n > 1).then(|| repo.point(&format!("p{}", n - 1)).unwrap());
            let opts = CaptureOptions {
                sources: sources.iter().map(|p| p.to_path_buf()).collect(),
                source_names: Vec::new(),
                changed_blocks: Vec::new(),
                chunk_size: CS as u32,
                level: 1,
                raw: true,
                workers: 2,
                id: format!("p{n}"),
                created: format!("2026-01-01T00:00:{n:02}Z"),
                host: "test".into(),
                tool: "test".into(),
                consistency: bkimg_capture::claim::Consistency::Offline,
                verify_cbt_every: 0,
            };
            bkimg_capture::capture(
                &repo,
                &store,
                parent.as_ref(),
                &opts,
                &bkimg_format::progress::Silent,
            )
            .unwrap();
            format!("p{n}")
        }

        fn two_disk_replica(&self) -> (Replica, PathBuf, PathBuf) {
            let (r0, r1) = (self.path("r0.img"), self.path("r1.img"));
            let specs = ReplicaSpec::parse_all(&[
                format!("disk0={}", r0.display()),
                format!("disk1={}", r1.display()),
            ])
            .unwrap();
            (Replica::new(&self.repo, specs).unwrap(), r0, r1)
        }
    }

    fn applied(o: Outcome) -> ApplyReport {
        match o {
            Outcome::Applied(r) => r,
            o => panic!("expected an apply, got {o:?}"),
        }
    }

    fn write_chunk(path: &Path, chunk: usize, seed: u64) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&noise(CS, seed), (chunk * CS) as u64)
            .unwrap();
    }

    fn mtime(p: &Path) -> std::time::SystemTime {
        fs::metadata(p).unwrap().modified().unwrap()
    }

    #[test]
    fn replica_arguments() {
        let a = |v: &[&str]| {
            ReplicaSpec::parse_all(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let one = a(&["/dev/sdb"]).unwrap();
        assert_eq!(
            one,
            [ReplicaSpec {
                disk: None,
                target: "/dev/sdb".into()
            }]
        );
        let two = a(&["disk0=/dev/sdb", "disk1=/dev/sdc"]).unwrap();
        assert_eq!(
            two[1],
            ReplicaSpec {
                disk: Some("disk1".into()),
                target: "/dev/sdc".into()
            }
        );
        // A '/' before the '=' makes it a path.
        let odd = a(&["./a=b.img"]).unwrap();
        assert_eq!(odd[0].disk, None);
        assert!(a(&[]).unwrap().is_empty());
        let err = |v: &[&str]| format!("{:#}", a(v).unwrap_err());
        assert!(err(&["/dev/sdb", "/dev/sdc"]).contains("DISK=TARGET for each"));
        assert!(err(&["/dev/sdb", "disk1=/dev/sdc"]).contains("DISK=TARGET for each"));
        assert!(err(&["disk0=/a", "disk0=/b"]).contains("more than one --replica"));
        assert!(err(&["disk0=/a", "disk1=/a"]).contains("more than one disk"));
        assert!(err(&["disk0="]).contains("no target"));
    }

    /// A journal written before multi-disk replicas (one `target`), with an apply cut
    /// short, reads as one unnamed replica whose apply is still to finish; it is written
    /// back in the new layout.
    #[test]
    fn journal_of_one_replica_is_migrated() {
        let fx = Fx::new();
        fs::create_dir_all(state_dir(&fx.repo)).unwrap();
        fs::write(
            state_dir(&fx.repo).join("replica.json"),
            r#"{"target": "/dev/sdb", "applied": "A",
                "applying": {"id": "B", "from": "A", "started": "2026-11-21T12:00:00Z"},
                "last_apply": {"id": "A", "from": null, "mode": "full", "chunks_written": 3,
                  "bytes_written": 9, "chunks_unchanged": 0, "seconds": 0.5,
                  "finished": "2026-11-21T11:00:00Z"}}"#,
        )
        .unwrap();
        let s = load_state(&fx.repo).unwrap();
        assert_eq!(s.version, JOURNAL_VERSION);
        assert_eq!(
            s.replicas,
            [ReplicaState {
                disk: None,
                target: "/dev/sdb".into(),
                holds: Some("A".into()),
                written: None,
            }]
        );
        let a = s.applying.as_ref().unwrap();
        assert_eq!(
            a.disks,
            [DiskApplying {
                disk: None,
                target: "/dev/sdb".into(),
                from: Some("A".into()),
                done: false,
                whole_because: None,
            }]
        );
        assert_eq!(
            s.last_apply.as_ref().unwrap().summary(),
            "applied A (whole restore, 9 bytes written) in 0.5 s"
        );
        // Same configuration: nothing to reconcile, the apply is kept.
        let mut same = s.clone();
        let spec = ReplicaSpec::parse_all(&["/dev/sdb".into()]).unwrap();
        assert!(!configure(&mut same, &spec));
        assert!(same.applying.is_some());

        save_state(&fx.repo, &s).unwrap();
        let text = fs::read_to_string(state_dir(&fx.repo).join("replica.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 3);
        assert!(v.get("target").is_none(), "{text}");
        let again = load_state(&fx.repo).unwrap();
        assert_eq!(again.replicas, s.replicas);
        assert_eq!(again.applying.unwrap().disks, a.disks);

        // A newer journal is refused, not misread.
        fs::write(
            state_dir(&fx.repo).join("replica.json"),
            r#"{"version": 4, "applied": null, "applying": null, "last_apply": null}"#,
        )
        .unwrap();
        assert!(format!("{:#}", load_state(&fx.repo).unwrap_err()).contains("newer bkimg"));
    }

    /// Another target for a disk forgets what it held (restored whole next), and an
    /// interrupted apply to other targets is dropped.
    #[test]
    fn reconfigured_replicas_start_over() {
        let mut s = State {
            replicas: vec![
                ReplicaState {
                    disk: Some("disk0".into()),
                    target: "/a".into(),
                    holds: Some("P".into()),
                    written: None,
                },
                ReplicaState {
                    disk: Some("disk1".into()),
                    target: "/b".into(),
                    holds: Some("P".into()),
                    written: None,
                },
            ],
            applied: Some("P".into()),
            applying: Some(Applying {
                id: "Q".into(),
                from: Some("P".into()),
                started: String::new(),
                disks: vec![
                    DiskApplying {
                        disk: Some("disk0".into()),
                        target: "/a".into(),
                        from: Some("P".into()),
                        done: false,
                        whole_because: None,
                    },
                    DiskApplying {
                        disk: Some("disk1".into()),
                        target: "/b".into(),
                        from: Some("P".into()),
                        done: false,
                        whole_because: None,
                    },
                ],
            }),
            ..Default::default()
        };
        // The same replicas in another order: nothing changes.
        let swapped = ReplicaSpec::parse_all(&["disk1=/b".into(), "disk0=/a".into()]).unwrap();
        assert!(!configure(&mut s, &swapped));
        let moved = ReplicaSpec::parse_all(&["disk0=/a".into(), "disk1=/c".into()]).unwrap();
        assert!(configure(&mut s, &moved));
        assert!(s.applying.is_none());
        // /a was half-written by the dropped apply: it is trusted no more.
        assert_eq!(
            s.replicas
                .iter()
                .map(|r| r.holds.clone())
                .collect::<Vec<_>>(),
            [None, None]
        );
        assert_eq!(s.applied, None);
    }

    /// Two disks: the first apply restores both whole; an incremental that changed one
    /// disk writes that disk's changed chunks and does not touch the other target.
    #[test]
    fn two_disks_full_then_changed_chunks_of_one() {
        let fx = Fx::new();
        let (d0, d1) = (fx.image("d0.img", 24, 1), fx.image("d1.img", 16, 2));
        fx.capture(1, &[&d0, &d1]);
        let (rep, r0, r1) = fx.two_disk_replica();
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!(r.mode, "full");
        assert_eq!(r.disks.len(), 2);
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
        assert_eq!(fs::read(&r1).unwrap(), fs::read(&d1).unwrap());
        assert!(matches!(rep.apply_latest().unwrap(), Outcome::UpToDate));

        write_chunk(&d0, 3, 10);
        write_chunk(&d0, 7, 11);
        fx.capture(2, &[&d0, &d1]);
        let before = mtime(&r1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!(r.mode, "changed-chunks", "{r:?}");
        assert_eq!((r.chunks_written, r.bytes_written), (2, 2 * CS as u64));
        let by_disk: Vec<_> = r
            .disks
            .iter()
            .map(|d| (d.disk.as_str(), d.chunks_written, d.chunks_unchanged))
            .collect();
        assert_eq!(by_disk, [("disk0", 2, 22), ("disk1", 0, 16)]);
        assert_eq!(r.disks[0].from.as_deref(), Some("p1"));
        assert!(
            r.summary().contains("disk0 ") && r.summary().contains("2 changed chunks"),
            "{}",
            r.summary()
        );
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
        assert_eq!(fs::read(&r1).unwrap(), fs::read(&d1).unwrap());
        assert_eq!(
            mtime(&r1),
            before,
            "the unchanged disk's replica was written"
        );

        let s = status(&fx.repo).unwrap();
        assert_eq!(s.applied.as_deref(), Some("p2"));
        assert_eq!(s.apply_state, "idle");
        assert!(s.replicas.iter().all(|r| r.holds.as_deref() == Some("p2")));
        assert_eq!(
            s.replica.unwrap(),
            format!("disk0={}, disk1={}", r0.display(), r1.display())
        );
    }

    /// A point whose disks are not the replicas' is recorded and left alone; the next
    /// point that matches is applied.
    #[test]
    fn point_of_other_disks_is_not_applied() {
        let fx = Fx::new();
        let (d0, d1) = (fx.image("d0.img", 8, 3), fx.image("d1.img", 8, 4));
        fx.capture(1, &[&d0, &d1]);
        let (rep, r0, _) = fx.two_disk_replica();
        applied(rep.apply_latest().unwrap());
        let held = fs::read(&r0).unwrap();

        write_chunk(&d0, 1, 20);
        fx.capture(2, &[&d0]);
        let n = match rep.apply_latest().unwrap() {
            Outcome::NotApplied(n) => n,
            o => panic!("{o:?}"),
        };
        assert_eq!(
            (n.id.as_str(), n.disks.as_slice()),
            ("p2", ["disk0".to_string()].as_slice())
        );
        assert!(
            n.reason
                .contains("has disks disk0 but the replicas are for disks disk0, disk1"),
            "{}",
            n.reason
        );
        assert_eq!(fs::read(&r0).unwrap(), held, "half-applied");
        let s = status(&fx.repo).unwrap();
        assert_eq!(
            (s.applied.as_deref(), s.latest.as_deref()),
            (Some("p1"), Some("p2"))
        );
        assert_eq!(s.not_applied.unwrap().id, "p2");
        assert!(s.applying.is_none());

        fx.capture(3, &[&d0, &d1]);
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!((r.id.as_str(), r.chunks_written), ("p3", 1));
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
        assert!(status(&fx.repo).unwrap().not_applied.is_none());

        // One unnamed replica and a point of two disks.
        let one = Replica::new(
            &fx.repo,
            ReplicaSpec::parse_all(&[fx.path("x.img").display().to_string()]).unwrap(),
        )
        .unwrap();
        match one.apply_latest().unwrap() {
            Outcome::NotApplied(n) => {
                assert!(n.reason.contains("--replica DISK=TARGET"), "{}", n.reason)
            }
            o => panic!("{o:?}"),
        }
        assert!(!fx.path("x.img").exists());
    }

    /// The journal says which disks are done: an apply cut short after the first disk
    /// finishes the others only.
    #[test]
    fn interrupted_apply_finishes_the_disks_not_done() {
        let fx = Fx::new();
        let (d0, d1) = (fx.image("d0.img", 8, 5), fx.image("d1.img", 8, 6));
        fx.capture(1, &[&d0, &d1]);
        let (rep, r0, r1) = fx.two_disk_replica();
        applied(rep.apply_latest().unwrap());
        write_chunk(&d0, 2, 30);
        write_chunk(&d1, 5, 31);
        write_chunk(&d1, 6, 32);
        fx.capture(2, &[&d0, &d1]);

        // As a standby killed while writing disk1 leaves it: disk0 done and flushed,
        // disk1 half-written.
        fs::copy(&d0, &r0).unwrap();
        let d1_new = fs::read(&d1).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&r1)
            .unwrap()
            .write_all_at(&d1_new[5 * CS..6 * CS], (5 * CS) as u64)
            .unwrap();
        let mut s = load_state(&fx.repo).unwrap();
        // disk1's chunk 5 is sampled: it reads as p2 has it, not as recorded for p1, and
        // that is no reason to restore the disk whole.
        let w = s.replicas[1].written.as_ref().unwrap();
        assert!(w.chunks.iter().any(|c| c.offset == 5 * CS as u64), "{w:?}");
        s.replicas[0].holds = Some("p2".into());
        s.applying = Some(Applying {
            id: "p2".into(),
            from: Some("p1".into()),
            started: now_rfc3339(),
            disks: vec![
                DiskApplying {
                    disk: Some("disk0".into()),
                    target: r0.display().to_string(),
                    from: Some("p1".into()),
                    done: true,
                    whole_because: None,
                },
                DiskApplying {
                    disk: Some("disk1".into()),
                    target: r1.display().to_string(),
                    from: Some("p1".into()),
                    done: false,
                    whole_because: None,
                },
            ],
        });
        save_state(&fx.repo, &s).unwrap();
        let st = status(&fx.repo).unwrap();
        assert_eq!(
            (st.apply_state.as_str(), st.applied.as_deref()),
            ("interrupted", Some("p1"))
        );

        let before = mtime(&r0);
        let r = rep
            .finish_interrupted()
            .unwrap()
            .expect("an apply to finish");
        assert_eq!(r.disks.len(), 1);
        assert_eq!(
            (r.disks[0].disk.as_str(), r.disks[0].chunks_written),
            ("disk1", 2)
        );
        assert_eq!(mtime(&r0), before);
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
        assert_eq!(fs::read(&r1).unwrap(), d1_new);
        let st = status(&fx.repo).unwrap();
        assert_eq!(
            (st.apply_state.as_str(), st.applied.as_deref()),
            ("idle", Some("p2"))
        );
    }

    /// Promotion stops applying; demote gives the replicas back, distrusted: the next
    /// apply restores them whole, overwriting what was written to them meanwhile.
    #[test]
    fn promote_then_demote_restores_whole() {
        let fx = Fx::new();
        let (d0, d1) = (fx.image("d0.img", 8, 7), fx.image("d1.img", 8, 8));
        fx.capture(1, &[&d0, &d1]);
        let (rep, r0, _) = fx.two_disk_replica();
        applied(rep.apply_latest().unwrap());
        assert!(!demote(&fx.repo).unwrap(), "not promoted: nothing to undo");

        let s = promote(&fx.repo, &plain_opener()).unwrap();
        assert!(s.promoted && s.promoted_at.is_some());
        write_chunk(&d0, 1, 40);
        fx.capture(2, &[&d0, &d1]);
        assert!(matches!(rep.apply_latest().unwrap(), Outcome::Promoted));
        write_chunk(&r0, 4, 41); // the promoted replica was booted and written

        assert!(demote(&fx.repo).unwrap());
        let s = status(&fx.repo).unwrap();
        assert!(!s.promoted && s.promoted_at.is_none());
        assert!(s.replicas.iter().all(|r| r.holds.is_none()));
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!((r.id.as_str(), r.mode.as_str()), ("p2", "full"));
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
    }

    /// Bytes changed in a sampled chunk of the replica (the first of the disk is always
    /// sampled) make the next apply a whole restore, recorded with the reason; the one
    /// after is incremental again.
    #[test]
    fn a_replica_changed_behind_the_standby_is_restored_whole() {
        let fx = Fx::new();
        let d0 = fx.image("d0.img", 12, 50);
        fx.capture(1, &[&d0]);
        let r0 = fx.path("r0.img");
        let rep = Replica::new(
            &fx.repo,
            ReplicaSpec::parse_all(&[r0.display().to_string()]).unwrap(),
        )
        .unwrap();
        assert_eq!(applied(rep.apply_latest().unwrap()).mode, "full");
        let w = load_state(&fx.repo).unwrap().replicas[0]
            .written
            .clone()
            .unwrap();
        assert_eq!(w.point, "p1");
        assert_eq!(w.device.kind, "file");
        assert!(w.chunks.iter().any(|c| c.offset == 0), "{w:?}");

        OpenOptions::new()
            .write(true)
            .open(&r0)
            .unwrap()
            .write_all_at(b"stray", 100)
            .unwrap();
        write_chunk(&d0, 6, 51);
        fx.capture(2, &[&d0]);
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!(r.mode, "full", "{r:?}");
        let why = r.disks[0].whole_because.as_deref().unwrap();
        assert!(why.contains("at byte 0 "), "{why}");
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
        let s = load_state(&fx.repo).unwrap();
        assert_eq!(s.replicas[0].written.as_ref().unwrap().point, "p2");
        assert_eq!(
            s.last_apply.unwrap().disks[0].whole_because.as_deref(),
            Some(why)
        );

        write_chunk(&d0, 9, 52);
        fx.capture(3, &[&d0]);
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!((r.mode.as_str(), r.chunks_written), ("changed-chunks", 1));
        assert_eq!(r.disks[0].whole_because, None);
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
    }

    /// A version-2 journal records no identity or sample: the replica it says holds a
    /// point is restored whole once (nothing vouches for it), then applied incrementally.
    #[test]
    fn a_version_2_journal_restores_whole_once() {
        let fx = Fx::new();
        let d0 = fx.image("d0.img", 8, 60);
        fx.capture(1, &[&d0]);
        let r0 = fx.path("r0.img");
        let specs = ReplicaSpec::parse_all(&[r0.display().to_string()]).unwrap();
        let rep = Replica::new(&fx.repo, specs).unwrap();
        applied(rep.apply_latest().unwrap());
        let path = state_dir(&fx.repo).join("replica.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v["version"] = 2.into();
        v["replicas"][0].as_object_mut().unwrap().remove("written");
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let s = load_state(&fx.repo).unwrap();
        assert_eq!(s.version, JOURNAL_VERSION);
        assert_eq!(s.replicas[0].holds.as_deref(), Some("p1"));
        assert!(s.replicas[0].written.is_none());

        write_chunk(&d0, 3, 61);
        fx.capture(2, &[&d0]);
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!(r.mode, "full");
        assert!(
            r.disks[0]
                .whole_because
                .as_deref()
                .unwrap()
                .contains("earlier bkimg"),
            "{r:?}"
        );
        write_chunk(&d0, 4, 62);
        fx.capture(3, &[&d0]);
        let r = applied(rep.apply_latest().unwrap());
        assert_eq!((r.mode.as_str(), r.chunks_written), ("changed-chunks", 1));
        assert_eq!(fs::read(&r0).unwrap(), fs::read(&d0).unwrap());
    }
}
