//! `bkimg capture --live`: capture running disks from one snapshot of all of them.
//!
//! Tracking is attached where missing, the pre-freeze hook runs, one snapshot of every
//! device is taken (filesystems frozen for the instant), the post-freeze hook runs, and
//! the capture reads the snapshot images as if they were the devices (the restore point
//! names the devices, so the next capture's incremental matches). A thread grows the
//! difference store while the capture runs. Each disk gets a change map from its
//! tracker's table: used when the parent was captured at the same tracking generation,
//! recorded either way so the next capture can use its map. The snapshot and its store
//! are released at the end, on errors, and on SIGINT/SIGTERM; a snapshot that failed
//! while it was read leaves no restore point.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bkimg_capture::{CaptureOptions, CaptureResult, ChangeSource, Progress};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::StoreWrite;
use bkimg_kmod::{
    Control, DevNum, ErrorKind, SnapshotInfo, SnapshotOptions, SnapshotState, StoreFile,
};
use clap::Args;
use serde_json::{json, Value};

use crate::exit::Interrupted;
use crate::snapshot::{self, failure_text, Grower, Step};
use indicatif::HumanBytes;

/// `capture` options for a live capture.
#[derive(Args)]
pub struct LiveArgs {
    /// Capture running disks from a live snapshot (bksnap kernel module): consistent,
    /// while they stay in use. Incrementals use the module's change tracking.
    #[arg(long, conflicts_with = "changed_blocks")]
    pub live: bool,
    /// Difference store file to create for the snapshot and remove afterwards; best on
    /// another disk than those captured (ext4 or XFS) [default: /var/tmp/bkimg-live-PID.store].
    #[arg(long, value_name = "FILE", requires = "live")]
    pub store: Option<PathBuf>,
    /// Initial store size; also the step it grows by when it runs low (e.g. 512M, 2G)
    /// [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "live", value_parser = crate::units::size)]
    pub store_size: Option<u64>,
    /// The store never grows past this [default: 4 x --store-size].
    #[arg(long, value_name = "SIZE", requires = "live", value_parser = crate::units::size)]
    pub max_store: Option<u64>,
    /// Shell command run just before the snapshot (e.g. flush a database); failing aborts.
    #[arg(long, value_name = "CMD", requires = "live")]
    pub pre_freeze: Option<String>,
    /// Shell command run just after the snapshot (also when taking it failed).
    #[arg(long, value_name = "CMD", requires = "live")]
    pub post_freeze: Option<String>,
}

/// Where a live capture is: what a signal may still undo.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preparing,
    Holding(u64),
    /// The snapshot was released early (a signal).
    Released,
    /// The manifest is being written: a signal waits for it.
    Committing,
    Done,
}

struct Shared {
    phase: Mutex<Phase>,
    interrupted: AtomicBool,
    stop: AtomicBool,
    store_path: PathBuf,
    /// Whether we created the store file (only then may a signal remove it by path).
    store_created: AtomicBool,
}

struct LiveDisk {
    device: PathBuf,
    image: PathBuf,
    generation: String,
    sequence: u64,
    map: Value,
}

/// A snapshot held for one capture; released when finished or dropped.
pub struct Session {
    control: Arc<Control>,
    shared: Arc<Shared>,
    id: u64,
    store: Arc<Mutex<Option<StoreFile>>>,
    watcher: Option<std::thread::JoinHandle<u64>>,
    disks: Vec<LiveDisk>,
    notes: Vec<String>,
}

impl Session {
    /// With `--live`: takes the snapshot and points `opts` at its images, with each disk's
    /// recorded source and change map. Without: nothing.
    pub fn start(
        args: &LiveArgs,
        opts: &mut CaptureOptions,
        parent: Option<&Point>,
        progress: &dyn Progress,
    ) -> Result<Option<Session>> {
        if !args.live {
            return Ok(None);
        }
        let devices = opts.sources.clone();
        let nums = devices
            .iter()
            .map(|d| Ok(DevNum::of_block_device(d)?))
            .collect::<Result<Vec<_>>>()?;
        let step = args.store_size.unwrap_or(1 << 30);
        let max = match args.max_store {
            Some(max) => max,
            None => step
                .checked_mul(4)
                .context("--store-size is too large to grow: give --max-store")?,
        };
        if max < step {
            bail!("--max-store is smaller than --store-size");
        }
        let control = Arc::new(Control::open()?);
        let store_path = args.store.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/var/tmp/bkimg-live-{}.store", std::process::id()))
        });
        let shared = Arc::new(Shared {
            phase: Mutex::new(Phase::Preparing),
            interrupted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            store_path: store_path.clone(),
            store_created: AtomicBool::new(false),
        });
        handle_signals(shared.clone(), control.clone())?;
        let mut notes = Vec::new();
        let mut note = |text: String| {
            progress.note(&text);
            notes.push(text);
        };

        for (d, n) in devices.iter().zip(&nums) {
            match control.read(*n, false) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    control.attach(*n, 0)?;
                    note(format!(
                        "{} was not tracked: tracking starts now (a new generation: this \
                         capture reads it whole, the next one only what changed)",
                        d.display()
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(on) = snapshot::store_overlaps(&store_path, &nums) {
            note(format!(
                "the store {} is on {}, which is captured: the restore point will hold the \
                 (empty) store file; a store on another disk avoids that",
                store_path.display(),
                on.describe()
            ));
        }
        let file = StoreFile::create(&store_path, step)?;
        shared.store_created.store(true, Ordering::SeqCst);
        let extents = file.extents().to_vec();
        let store = Arc::new(Mutex::new(Some(file)));
        check_interrupted(&shared)?;

        if let Some(cmd) = &args.pre_freeze {
            snapshot::run_hook("pre-freeze", cmd, &devices)?;
        }
        let created = {
            // Held across the create: a signal now waits until the snapshot is known.
            let mut phase = shared.phase.lock().expect("phase lock");
            let r = match check_interrupted(&shared) {
                Ok(()) => control
                    .create(&nums, &extents, SnapshotOptions::default())
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            if let Ok(id) = r {
                *phase = Phase::Holding(id);
            }
            r
        };
        if let Some(cmd) = &args.post_freeze {
            if let Err(e) = snapshot::run_hook("post-freeze", cmd, &devices) {
                note(format!("warning: {e:#}"));
            }
        }
        let id = created?;
        let mut session = Session {
            control: control.clone(),
            shared: shared.clone(),
            id,
            store: store.clone(),
            watcher: None,
            disks: Vec::new(),
            notes: Vec::new(),
        };
        // From here on, dropping `session` releases the snapshot and the store.
        check_interrupted(&shared)?;
        // A signal releases the snapshot under these: say "interrupted", not what failed.
        let info = or_interrupted(&shared, control.info(id).map_err(Into::into))?;
        or_interrupted(&shared, snapshot::wait_for_images(&info))?;

        let (control2, shared2, store2) = (control.clone(), shared.clone(), store.clone());
        session.watcher = Some(std::thread::spawn(move || {
            let mut grower = Grower::new(&control2, id, &store2, step, max);
            while !shared2.stop.load(Ordering::SeqCst) {
                if !matches!(grower.step(Duration::from_millis(500)), Step::Running) {
                    break;
                }
            }
            grower.grown
        }));

        let mut maps = Vec::new();
        for (i, (device, sd)) in devices.iter().zip(&info.devs).enumerate() {
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
                session.disks.push(LiveDisk {
                    device: device.clone(),
                    image: sd.image_path.clone(),
                    generation,
                    sequence: sd.sequence,
                    map: Value::Null,
                });
                continue;
            }
            let map = bkimg_kmod::change_map(&state, from, sd.sequence)?;
            let bytes: u64 = map.byte_ranges().map(|r| r.end - r.start).sum();
            session.disks.push(LiveDisk {
                device: device.clone(),
                image: sd.image_path.clone(),
                generation,
                sequence: sd.sequence,
                map: json!({
                    "from_sequence": map.from_sequence,
                    "to_sequence": map.to_sequence,
                    "ranges": map.ranges.len(),
                    "bytes": bytes,
                }),
            });
            maps.push(Some(ChangeSource::Map {
                map,
                label: format!("of the tracker of {}", device.display()),
            }));
        }
        session.notes = notes;
        opts.source_names = devices
            .iter()
            .map(|d| Some(d.display().to_string()))
            .collect();
        opts.sources = info.devs.iter().map(|d| d.image_path.clone()).collect();
        opts.changed_blocks = maps;
        for d in &session.disks {
            progress.note(&format!(
                "snapshot {id}: reading {} from {} (generation {}, snapshot {})",
                d.device.display(),
                d.image.display(),
                d.generation,
                d.sequence
            ));
        }
        Ok(Some(session))
    }

    /// Captures from the images; commits only if the snapshot is intact and no signal came.
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
                return Err(SnapshotFailed(self.failed_message(&info)).into());
            }
            *phase = Phase::Committing;
            Ok(())
        };
        let result =
            bkimg_capture::capture_checked(repo, store, parent, opts, progress, &before_commit);
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
                    Err(e.context(self.failed_message(&info)))
                }
                _ => Err(e),
            },
        }
    }

    fn failed_message(&self, info: &SnapshotInfo) -> String {
        format!(
            "{} while it was read; nothing was committed: rerun with a larger --store-size \
             or --max-store (or at a quieter time)",
            failure_text(info)
        )
    }

    /// Releases the snapshot and removes the store; returns the `live` part of the JSON
    /// report. Problems here are warnings: the restore point (if any) is committed.
    pub fn finish(mut self) -> Value {
        let info = self.control.info(self.id).ok();
        let grown = self.release();
        let store_size = info.as_ref().map_or(0, |i| i.store_sectors * 512);
        if let Some(i) = &info {
            eprintln!(
                "bkimg: snapshot {} released: {} of {} store used ({} chunks copied)",
                self.id,
                HumanBytes(i.store_used_sectors * 512),
                HumanBytes(store_size),
                i.copied_chunks
            );
        }
        json!({
            "snapshot": self.id,
            "store": self.shared.store_path,
            "store_size": store_size,
            "store_used": info.as_ref().map(|i| i.store_used_sectors * 512),
            "store_grown": grown,
            "copied_chunks": info.as_ref().map(|i| i.copied_chunks),
            "disks": self.disks.iter().enumerate().map(|(i, d)| json!({
                "disk": format!("disk{i}"),
                "device": d.device,
                "image": d.image,
                "generation": d.generation,
                "sequence": d.sequence,
                "change_map": d.map,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
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
                        eprintln!(
                            "bkimg: warning: {e}; release it with: bkimg snapshot destroy {}",
                            self.id
                        );
                    }
                }
            }
            *phase = Phase::Done;
        }
        if let Some(file) = self.store.lock().expect("store lock").take() {
            if let Err(e) = file.remove() {
                eprintln!("bkimg: warning: {e}");
            }
        }
        grown
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if *self.shared.phase.lock().expect("phase lock") != Phase::Done {
            self.release();
        }
    }
}

/// The snapshot failed while the capture read it.
#[derive(Debug)]
struct SnapshotFailed(String);

impl std::fmt::Display for SnapshotFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SnapshotFailed {}

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

/// SIGINT and SIGTERM go to a thread of their own (blocked everywhere else; the threads
/// started later inherit that). The first releases the snapshot, which ends the capture
/// reading it (it then fails with "interrupted" and commits nothing); a second one exits
/// at once. A signal while the manifest is written waits for it.
fn handle_signals(shared: Arc<Shared>, control: Arc<Control>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| anyhow!("cannot block SIGINT and SIGTERM: {e}"))?;
    std::thread::spawn(move || {
        let mut count = 0;
        loop {
            let Ok(sig) = set.wait() else { continue };
            count += 1;
            shared.interrupted.store(true, Ordering::SeqCst);
            let mut phase = shared.phase.lock().unwrap_or_else(|p| p.into_inner());
            match *phase {
                Phase::Committing => {
                    eprintln!(
                        "bkimg: {sig}: the restore point is being committed; finishing that first"
                    );
                    continue;
                }
                Phase::Holding(id) => {
                    eprintln!("bkimg: {sig}: releasing snapshot {id}; nothing is committed");
                    let _ = control.destroy(id);
                    *phase = Phase::Released;
                }
                Phase::Done => std::process::exit(crate::exit::INTERRUPTED),
                Phase::Preparing | Phase::Released => {}
            }
            if count >= 2 {
                if shared.store_created.load(Ordering::SeqCst) {
                    let _ = std::fs::remove_file(&shared.store_path);
                }
                eprintln!("bkimg: error: {}", Interrupted);
                std::process::exit(crate::exit::INTERRUPTED);
            }
        }
    });
    Ok(())
}
