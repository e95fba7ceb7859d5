//! Live capture: capture running disks from one snapshot of all of them (the bksnap
//! kernel module).
//!
//! Tracking is attached where missing, the pre-freeze hook runs, one snapshot of every
//! device is taken (filesystems frozen for the instant), the post-freeze hook runs, and
//! the capture reads the snapshot images as if they were the devices (the restore point
//! names the devices, so the next capture's incremental matches). A thread grows the
//! difference store while the capture runs. Each disk gets a change map from its
//! tracker's table: used when the parent was captured at the same tracking generation,
//! recorded either way so the next capture can use its map. The snapshot and its store
//! are released at the end, on errors, and when interrupted ([`Interrupter`]); a snapshot
//! that failed while it was read leaves no restore point.
//!
//! A session goes through [`Phase`]s: preparing, holding the snapshot, committing the
//! restore point, done (or released early by an interruption). The kernel side is the
//! [`SnapshotControl`] trait, so the phases can be tested without the module.

mod control;
mod grow;
#[cfg(test)]
mod tests;

pub use control::{failure_text, human_bytes, store_overlaps, wait_for_images, SnapshotControl};
pub use grow::{Grower, Step};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::StoreWrite;
use bkimg_kmod::{DevNum, ErrorKind, SnapshotInfo, SnapshotOptions, SnapshotState, StoreFile};

use crate::{CaptureOptions, CaptureResult, ChangeSource, Progress};

/// Where a person reads what the session does besides progress (store growth, warnings):
/// one line at a time.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// How to take and hold the snapshot.
#[derive(Clone, Debug, Default)]
pub struct LiveOptions {
    /// Difference store file to create and remove afterwards (default:
    /// /var/tmp/bkimg-live-PID.store).
    pub store: Option<PathBuf>,
    /// Initial store size, and the step it grows by (default 1 GiB).
    pub store_size: Option<u64>,
    /// The store never grows past this (default 4 x `store_size`).
    pub max_store: Option<u64>,
    /// Shell command run just before the snapshot; failing aborts.
    pub pre_freeze: Option<String>,
    /// Shell command run just after the snapshot (also when taking it failed).
    pub post_freeze: Option<String>,
}

/// Stopped by an interruption (SIGINT or SIGTERM) before anything was committed.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: nothing was committed (run the same command again)")]
pub struct Interrupted;

/// The snapshot failed while the capture read it: nothing was committed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SnapshotFailed(pub String);

/// Where a live capture is: what an interruption may still undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    Holding(u64),
    /// The snapshot was released early (an interruption).
    Released,
    /// The manifest is being written: an interruption waits for it.
    Committing,
    Done,
}

struct Shared {
    phase: Mutex<Phase>,
    interrupted: AtomicBool,
    stop: AtomicBool,
    store_path: PathBuf,
    /// Whether we created the store file (only then may it be removed by path).
    store_created: AtomicBool,
    /// A destroy failed: the kernel may still write into the store's blocks, so the file
    /// must stay (removed, the filesystem would hand its blocks to other files).
    store_in_use: AtomicBool,
}

/// One disk read from the snapshot.
#[derive(Clone, Debug)]
pub struct LiveDisk {
    pub device: PathBuf,
    pub image: PathBuf,
    pub generation: String,
    pub sequence: u64,
    /// The change map built from the tracker; None if it could not be trusted.
    pub change_map: Option<MapSummary>,
}

#[derive(Clone, Debug)]
pub struct MapSummary {
    pub from_sequence: u64,
    pub to_sequence: u64,
    pub ranges: usize,
    pub bytes: u64,
}

/// What a finished session did: the `live` part of the capture's report.
#[derive(Clone, Debug)]
pub struct LiveReport {
    pub snapshot: u64,
    pub store: PathBuf,
    pub store_size: u64,
    /// None when the snapshot could not be looked at any more.
    pub store_used: Option<u64>,
    pub store_grown: u64,
    pub copied_chunks: Option<u64>,
    pub disks: Vec<LiveDisk>,
    pub notes: Vec<String>,
}

/// What an interruption found (and did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// Before the snapshot: the session stops at its next step.
    Preparing,
    /// The snapshot with this id is released; the capture reading it fails.
    Releasing(u64),
    /// Released already.
    Released,
    /// The restore point is being committed: that finishes first.
    Committing,
    /// The session is over.
    Done,
}

/// Interrupts a session from another thread (a signal handler).
#[derive(Clone)]
pub struct Interrupter {
    shared: Arc<Shared>,
    control: Arc<dyn SnapshotControl>,
}

impl Interrupter {
    /// Marks the session interrupted and releases its snapshot if it holds one.
    /// `announce` is called before that and `then` after, both while the session cannot
    /// change phase (a caller may exit the process in `then`).
    pub fn interrupt(&self, announce: impl FnOnce(Interruption), then: impl FnOnce(Interruption)) {
        self.shared.interrupted.store(true, Ordering::SeqCst);
        let mut phase = self.shared.phase.lock().unwrap_or_else(|p| p.into_inner());
        let what = match *phase {
            Phase::Preparing => Interruption::Preparing,
            Phase::Holding(id) => Interruption::Releasing(id),
            Phase::Released => Interruption::Released,
            Phase::Committing => Interruption::Committing,
            Phase::Done => Interruption::Done,
        };
        announce(what);
        if let Interruption::Releasing(id) = what {
            match self.control.destroy(id) {
                Ok(()) => *phase = Phase::Released,
                Err(e) if e.kind() == ErrorKind::NotFound => *phase = Phase::Released,
                Err(_) => self.shared.store_in_use.store(true, Ordering::SeqCst),
            }
        }
        then(what);
    }

    /// Removes the store file if the session created it and no snapshot may still write
    /// to it (before exiting at once). Returns the path when it had to be kept.
    pub fn remove_store(&self) -> Option<PathBuf> {
        if !self.shared.store_created.load(Ordering::SeqCst) {
            return None;
        }
        let holding = matches!(
            *self.shared.phase.lock().unwrap_or_else(|p| p.into_inner()),
            Phase::Holding(_) | Phase::Committing
        );
        if holding || self.shared.store_in_use.load(Ordering::SeqCst) {
            return Some(self.shared.store_path.clone());
        }
        let _ = bkimg_kmod::remove_store_path(&self.shared.store_path);
        None
    }
}

/// A live capture session: holds the snapshot from [`Session::start`] until
/// [`Session::finish`] or drop.
pub struct Session {
    control: Arc<dyn SnapshotControl>,
    shared: Arc<Shared>,
    options: LiveOptions,
    devices: Vec<PathBuf>,
    nums: Vec<DevNum>,
    step: u64,
    max: u64,
    log: Log,
    id: u64,
    store: Arc<Mutex<Option<StoreFile>>>,
    watcher: Option<std::thread::JoinHandle<u64>>,
    disks: Vec<LiveDisk>,
    notes: Vec<String>,
}

impl Session {
    /// A session for capturing `devices` (block devices); `open` opens the control device
    /// once the options are known to be good. Nothing is held yet.
    pub fn new(
        options: &LiveOptions,
        devices: &[PathBuf],
        open: impl FnOnce() -> Result<Arc<dyn SnapshotControl>>,
        log: Log,
    ) -> Result<Session> {
        let nums = devices
            .iter()
            .map(|d| Ok(DevNum::of_block_device(d)?))
            .collect::<Result<Vec<_>>>()?;
        let step = options.store_size.unwrap_or(1 << 30);
        let max = match options.max_store {
            Some(max) => max,
            None => step
                .checked_mul(4)
                .context("--store-size is too large to grow: give --max-store")?,
        };
        if max < step {
            bail!("--max-store is smaller than --store-size");
        }
        let control = open()?;
        let store_path = options.store.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/var/tmp/bkimg-live-{}.store", std::process::id()))
        });
        Ok(Session {
            control,
            shared: Arc::new(Shared {
                phase: Mutex::new(Phase::Preparing),
                interrupted: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                store_path,
                store_created: AtomicBool::new(false),
                store_in_use: AtomicBool::new(false),
            }),
            options: options.clone(),
            devices: devices.to_vec(),
            nums,
            step,
            max,
            log,
            id: 0,
            store: Arc::new(Mutex::new(None)),
            watcher: None,
            disks: Vec::new(),
            notes: Vec::new(),
        })
    }

    pub fn interrupter(&self) -> Interrupter {
        Interrupter {
            shared: self.shared.clone(),
            control: self.control.clone(),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.shared.phase.lock().expect("phase lock")
    }

    /// Takes the snapshot and points `opts` at its images, with each disk's recorded
    /// source and change map.
    pub fn start(
        &mut self,
        opts: &mut CaptureOptions,
        parent: Option<&Point>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let control = self.control.clone();
        let shared = self.shared.clone();
        let mut notes = Vec::new();
        let mut note = |text: String| {
            progress.note(&text);
            notes.push(text);
        };

        for (d, n) in self.devices.iter().zip(&self.nums) {
            match control.read(*n, false) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    control.attach(*n)?;
                    note(format!(
                        "{} was not tracked: tracking starts now (a new generation: this \
                         capture reads it whole, the next one only what changed)",
                        d.display()
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(on) = store_overlaps(&shared.store_path, &self.nums) {
            note(format!(
                "the store {} is on {}, which is captured: the restore point will hold the \
                 (empty) store file; a store on another disk avoids that",
                shared.store_path.display(),
                on.describe()
            ));
        }
        let file = StoreFile::create(&shared.store_path, self.step)?;
        shared.store_created.store(true, Ordering::SeqCst);
        let extents = file.extents().to_vec();
        *self.store.lock().expect("store lock") = Some(file);
        check_interrupted(&shared)?;

        if let Some(cmd) = &self.options.pre_freeze {
            run_hook("pre-freeze", cmd, &self.devices)?;
        }
        let created = {
            // Held across the create: an interruption now waits until the snapshot is
            // known.
            let mut phase = shared.phase.lock().expect("phase lock");
            let r = match check_interrupted(&shared) {
                Ok(()) => control
                    .create(&self.nums, &extents, SnapshotOptions::default())
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            if let Ok(id) = r {
                *phase = Phase::Holding(id);
            }
            r
        };
        if let Some(cmd) = &self.options.post_freeze {
            if let Err(e) = run_hook("post-freeze", cmd, &self.devices) {
                note(format!("warning: {e:#}"));
            }
        }
        let id = created?;
        self.id = id;
        // From here on, dropping the session releases the snapshot and the store.
        check_interrupted(&shared)?;
        // An interruption releases the snapshot under these: say "interrupted", not what
        // failed.
        let info = or_interrupted(&shared, control.info(id).map_err(Into::into))?;
        or_interrupted(&shared, control.wait_for_images(&info))?;

        let (control2, shared2, store2) = (control.clone(), shared.clone(), self.store.clone());
        let (step, max, log) = (self.step, self.max, self.log.clone());
        self.watcher = Some(std::thread::spawn(move || {
            let mut grower = Grower::new(&*control2, id, &store2, step, max, &*log);
            while !shared2.stop.load(Ordering::SeqCst) {
                if !matches!(grower.step(Duration::from_millis(500)), Step::Running) {
                    break;
                }
            }
            grower.grown
        }));

        let mut maps = Vec::new();
        for (i, (device, sd)) in self.devices.iter().zip(&info.devs).enumerate() {
            let state = or_interrupted(&shared, control.read(sd.dev, true).map_err(Into::into))?;
            let generation = sd.generation_hex();
            let parent_tracking = parent
                .and_then(|p| {
                    p.manifest
                        .disks
                        .iter()
                        .find(|d| d.name == format!("disk{i}"))
                })
                .and_then(|d| d.tracking.as_ref());
            // From the parent's snapshot when it is of this generation; otherwise the map
            // only records where tracking stands (capture reads the disk whole and says
            // why).
            let from = parent_tracking
                .filter(|t| t.generation == generation && t.sequence <= sd.sequence)
                .map_or(0, |t| t.sequence);
            if state.generation != sd.generation {
                // Cannot happen while the snapshot holds the device; never trust it if so.
                note(format!(
                    "the tracker of {} changed generation during the snapshot: reading it whole",
                    device.display()
                ));
                maps.push(None);
                self.disks.push(LiveDisk {
                    device: device.clone(),
                    image: sd.image_path.clone(),
                    generation,
                    sequence: sd.sequence,
                    change_map: None,
                });
                continue;
            }
            let map = bkimg_kmod::change_map(&state, from, sd.sequence)?;
            let bytes: u64 = map.byte_ranges().map(|r| r.end - r.start).sum();
            self.disks.push(LiveDisk {
                device: device.clone(),
                image: sd.image_path.clone(),
                generation,
                sequence: sd.sequence,
                change_map: Some(MapSummary {
                    from_sequence: map.from_sequence,
                    to_sequence: map.to_sequence,
                    ranges: map.ranges.len(),
                    bytes,
                }),
            });
            maps.push(Some(ChangeSource::Map {
                map,
                label: format!("of the tracker of {}", device.display()),
            }));
        }
        self.notes = notes;
        opts.source_names = self
            .devices
            .iter()
            .map(|d| Some(d.display().to_string()))
            .collect();
        opts.sources = info.devs.iter().map(|d| d.image_path.clone()).collect();
        opts.changed_blocks = maps;
        for d in &self.disks {
            progress.note(&format!(
                "snapshot {id}: reading {} from {} (generation {}, snapshot {})",
                d.device.display(),
                d.image.display(),
                d.generation,
                d.sequence
            ));
        }
        Ok(())
    }

    /// Captures from the images; commits only if the snapshot is intact and no
    /// interruption came.
    pub fn capture(
        &self,
        repo: &Repository,
        store: &dyn StoreWrite,
        parent: Option<&Point>,
        opts: &CaptureOptions,
        progress: &dyn Progress,
    ) -> Result<CaptureResult> {
        let before_commit = || -> Result<()> {
            let mut phase = self.shared.phase.lock().expect("phase lock");
            if self.shared.interrupted.load(Ordering::SeqCst) {
                return Err(Interrupted.into());
            }
            let info = self
                .control
                .info(self.id)
                .with_context(|| format!("snapshot {} disappeared during the capture", self.id))?;
            if info.state != SnapshotState::Active {
                return Err(SnapshotFailed(failed_message(&info)).into());
            }
            *phase = Phase::Committing;
            Ok(())
        };
        let result = crate::capture_checked(repo, store, parent, opts, progress, &before_commit);
        let committing = {
            let mut phase = self.shared.phase.lock().expect("phase lock");
            let was = *phase;
            if was == Phase::Committing {
                *phase = Phase::Holding(self.id);
            }
            was == Phase::Committing
        };
        match result {
            Ok(r) => Ok(r),
            Err(e)
                if e.downcast_ref::<Interrupted>().is_some()
                    || e.downcast_ref::<SnapshotFailed>().is_some() =>
            {
                Err(e)
            }
            Err(_) if self.shared.interrupted.load(Ordering::SeqCst) && !committing => {
                Err(Interrupted.into())
            }
            Err(e) => match self.control.info(self.id) {
                // Reads of a failed snapshot's images fail: say why.
                Ok(info) if info.state == SnapshotState::Failed => {
                    Err(e.context(failed_message(&info)))
                }
                _ => Err(e),
            },
        }
    }

    /// Releases the snapshot and removes the store; what the session did. Problems here
    /// are warnings (to the log): the restore point (if any) is committed.
    pub fn finish(mut self) -> LiveReport {
        let info = self.control.info(self.id).ok();
        let grown = self.release();
        LiveReport {
            snapshot: self.id,
            store: self.shared.store_path.clone(),
            store_size: info.as_ref().map_or(0, |i| i.store_sectors * 512),
            store_used: info.as_ref().map(|i| i.store_used_sectors * 512),
            store_grown: grown,
            copied_chunks: info.as_ref().map(|i| i.copied_chunks),
            disks: std::mem::take(&mut self.disks),
            notes: std::mem::take(&mut self.notes),
        }
    }

    /// Stops the watcher, destroys the snapshot, removes the store (once).
    fn release(&mut self) -> u64 {
        self.shared.stop.store(true, Ordering::SeqCst);
        let grown = self.watcher.take().and_then(|w| w.join().ok()).unwrap_or(0);
        {
            let mut phase = self.shared.phase.lock().expect("phase lock");
            if matches!(*phase, Phase::Holding(_) | Phase::Committing) {
                if let Err(e) = self.control.destroy(self.id) {
                    if e.kind() != ErrorKind::NotFound {
                        self.shared.store_in_use.store(true, Ordering::SeqCst);
                        (self.log)(&format!(
                            "warning: {e}; release it with: bkimg snapshot destroy {}",
                            self.id
                        ));
                    }
                }
            }
            *phase = Phase::Done;
        }
        if let Some(mut file) = self.store.lock().expect("store lock").take() {
            if self.shared.store_in_use.load(Ordering::SeqCst) {
                // Still the kernel's: freeing its blocks would let it write into other
                // files.
                (self.log)(&format!(
                    "warning: the store {} is kept (immutable), as snapshot {} may still write \
                     to it: release both with `bkimg snapshot destroy {} --store {}`",
                    self.shared.store_path.display(),
                    self.id,
                    self.id,
                    self.shared.store_path.display()
                ));
                file.keep(true);
            } else if let Err(e) = file.remove() {
                (self.log)(&format!("warning: {e}"));
            }
        }
        grown
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if *self.shared.phase.lock().unwrap_or_else(|p| p.into_inner()) != Phase::Done {
            self.release();
        }
    }
}

fn failed_message(info: &SnapshotInfo) -> String {
    format!(
        "{} while it was read; nothing was committed: rerun with a larger --store-size \
         or --max-store (or at a quieter time)",
        failure_text(info)
    )
}

fn or_interrupted<T>(shared: &Shared, r: Result<T>) -> Result<T> {
    match r {
        Err(_) if shared.interrupted.load(Ordering::SeqCst) => Err(Interrupted.into()),
        r => r,
    }
}

fn check_interrupted(shared: &Shared) -> Result<()> {
    if shared.interrupted.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Runs a freeze hook: `sh -c CMD`, its output on stderr (stdout is for results).
pub fn run_hook(what: &str, cmd: &str, devices: &[PathBuf]) -> Result<()> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let list = devices
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("BKIMG_HOOK", what)
        .env("BKIMG_DEVICES", list)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(stderr))
        .status()
        .with_context(|| format!("cannot run the {what} command {cmd:?}"))?;
    if !status.success() {
        bail!("the {what} command {cmd:?} failed ({status})");
    }
    Ok(())
}
