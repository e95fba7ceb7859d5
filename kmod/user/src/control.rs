//! The control device /dev/bksnap: change trackers, snapshots and their events.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::device::{AsDevice, DevNum};
use crate::error::{KmodError, Result};
use crate::saved::SavedTracker;
use crate::{sys, uapi};

pub const CONTROL_PATH: &str = "/dev/bksnap";

/// An open control device of a module that speaks interface version 1.
pub struct Control {
    file: File,
    version: ModuleVersion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleVersion {
    pub major: u32,
    pub minor: u32,
    pub features: u64,
}

impl ModuleVersion {
    pub fn change_tracking(&self) -> bool {
        self.features & uapi::FEATURE_CBT != 0
    }

    pub fn snapshots(&self) -> bool {
        self.features & uapi::FEATURE_SNAPSHOT != 0
    }
}

/// A tracker's state, and its table when asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerState {
    pub dev: DevNum,
    /// Tracking block size in bytes.
    pub block_size: u32,
    pub device_sectors: u64,
    /// Table length: one byte per block.
    pub blocks: u64,
    pub generation: [u8; 16],
    /// The active sequence: writes now are marked with it.
    pub sequence: u64,
    /// The snapshot holding the device.
    pub snapshot_id: Option<u64>,
    /// Write requests seen since attach.
    pub writes: u64,
    /// Per block, the sequence that was active when it was last written (0: not since the
    /// generation began).
    pub table: Option<Vec<u8>>,
}

impl TrackerState {
    fn from_arg(dev: DevNum, a: &uapi::TrackerArg) -> TrackerState {
        TrackerState {
            dev,
            block_size: a.block_size,
            device_sectors: a.device_sectors,
            blocks: a.blocks,
            generation: a.generation,
            sequence: a.sequence,
            snapshot_id: (a.snapshot_id != 0).then_some(a.snapshot_id),
            writes: a.writes,
            table: None,
        }
    }

    pub fn device_size(&self) -> u64 {
        self.device_sectors * 512
    }

    pub fn generation_hex(&self) -> String {
        hex::encode(self.generation)
    }

    /// Fails unless the tracker is still at `expected` (32 hex digits): a table from
    /// another generation must not be used to skip reading anything.
    pub fn check_generation(&self, expected: &str) -> Result<()> {
        if !self.generation_hex().eq_ignore_ascii_case(expected.trim()) {
            return Err(KmodError::StaleGeneration {
                dev: self.dev.describe(),
                expected: expected.trim().to_ascii_lowercase(),
                found: self.generation_hex(),
            });
        }
        Ok(())
    }
}

/// Sectors `[sector, sector + sectors)` of a device (512-byte sectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub sectors: u64,
}

/// A piece of a difference store: sectors of a block device nothing else uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub dev: DevNum,
    pub sector: u64,
    pub sectors: u64,
}

impl Extent {
    fn to_uapi(self) -> uapi::Extent {
        uapi::Extent {
            major: self.dev.major,
            minor: self.dev.minor,
            sector: self.sector,
            sectors: self.sectors,
            reserved: 0,
        }
    }
}

/// How a snapshot is taken.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotOptions {
    /// Copy-on-write unit in sectors (power of two, 8 to 2048); 0: the module's default
    /// (128, 64 KiB).
    pub chunk_sectors: u32,
    /// A LOW_SPACE event comes when the free store falls to this; 0: a quarter of it.
    pub low_water_sectors: u64,
    /// Do not freeze the filesystems (crash-consistent image only).
    pub no_freeze: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotState {
    Active,
    /// Copy-on-write stopped (store full, I/O error or timeout); the images return errors.
    Failed,
    Unknown(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub state: SnapshotState,
    /// Negative errno of the failure, or 0.
    pub error: i32,
    pub store_sectors: u64,
    pub store_used_sectors: u64,
    pub low_water_sectors: u64,
    pub chunk_sectors: u32,
    pub copied_chunks: u64,
    /// CLOCK_MONOTONIC at creation, nanoseconds.
    pub created_ns: u64,
    pub devs: Vec<SnapshotDev>,
}

impl SnapshotInfo {
    /// The failure, in words ("No space left on device").
    pub fn error_text(&self) -> Option<String> {
        (self.error != 0).then(|| describe_errno(self.error))
    }
}

/// One device of a snapshot and its read-only image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDev {
    pub dev: DevNum,
    pub image: DevNum,
    /// `/dev/bksnap<id>-<index>`.
    pub image_path: PathBuf,
    pub sectors: u64,
    /// The snapshot's generation and number in the device's tracker: a change map "since
    /// this snapshot" starts at `sequence`.
    pub generation: [u8; 16],
    pub sequence: u64,
}

impl SnapshotDev {
    pub fn generation_hex(&self) -> String {
        hex::encode(self.generation)
    }
}

/// The path of a snapshot image.
pub fn image_path(id: u64, index: usize) -> PathBuf {
    PathBuf::from(format!("/dev/bksnap{id}-{index}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The store's free space fell to the low-water mark: add extents (STORE_ADD).
    LowSpace,
    /// The snapshot failed.
    Failed,
    Unknown(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub snapshot_id: u64,
    /// Negative errno (FAILED), or 0.
    pub error: i32,
    pub store_sectors: u64,
    pub store_used_sectors: u64,
}

/// "No space left on device" for -28.
pub fn describe_errno(err: i32) -> String {
    Errno::from_raw(err.abs()).desc().to_string()
}

impl Control {
    /// Opens /dev/bksnap and checks the module speaks version 1.
    pub fn open() -> Result<Control> {
        Control::open_at(Path::new(CONTROL_PATH))
    }

    pub fn open_at(path: &Path) -> Result<Control> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KmodError::NotLoaded {
                path: path.to_path_buf(),
            },
            _ => KmodError::io(format!("cannot open {}", path.display()), e),
        })?;
        let v = sys::version(&file).map_err(|e| {
            KmodError::ioctl(
                format!(
                    "{} does not answer the bksnap version request",
                    path.display()
                ),
                e,
            )
        })?;
        if v.major != uapi::VERSION_MAJOR {
            return Err(KmodError::Version {
                major: v.major,
                minor: v.minor,
            });
        }
        Ok(Control {
            file,
            version: ModuleVersion {
                major: v.major,
                minor: v.minor,
                features: v.features,
            },
        })
    }

    pub fn version(&self) -> ModuleVersion {
        self.version
    }

    // ----------------------------------------------------------------- trackers

    /// Starts tracking writes to `dev`; `block_size` 0 lets the module choose.
    pub fn attach(&self, dev: impl AsDevice, block_size: u32) -> Result<TrackerState> {
        let dev = dev.devnum()?;
        let mut a = tracker_arg(dev);
        a.block_size = block_size;
        sys::tracker_attach(&self.file, &mut a, None).map_err(|e| {
            let what = format!("cannot start tracking {}", dev.describe());
            match e {
                Errno::EINVAL if block_size != 0 => KmodError::ioctl(
                    format!(
                        "{what} (block size {block_size} is not a power of two, is smaller \
                         than the device's sectors, or gives more than 2^26 blocks)"
                    ),
                    e,
                ),
                Errno::EINVAL => KmodError::ioctl(format!("{what} (an empty device?)"), e),
                _ => tracker_err(what, e),
            }
        })?;
        Ok(TrackerState::from_arg(dev, &a))
    }

    /// Continues a run of tracking saved by [`Control::detach_save`] at a clean shutdown.
    /// The saved state must be of this device (its size is checked here) and nothing may
    /// have written to it since it was saved.
    pub fn attach_restore(&self, dev: impl AsDevice, saved: &SavedTracker) -> Result<TrackerState> {
        let dev = dev.devnum()?;
        let sectors = dev.sectors()?;
        if sectors != saved.device_sectors {
            return Err(KmodError::Invalid(format!(
                "the saved tracker state is of a device of {} bytes, but {} has {} bytes: \
                 not this device's state",
                saved.device_sectors * 512,
                dev.describe(),
                sectors * 512
            )));
        }
        let mut a = tracker_arg(dev);
        a.flags = uapi::TRACKER_RESTORE;
        a.block_size = saved.block_size;
        a.generation = saved.generation;
        a.sequence = saved.sequence;
        sys::tracker_attach(&self.file, &mut a, Some(&saved.table)).map_err(|e| {
            tracker_err(
                format!(
                    "cannot restore tracking of {} from its saved state",
                    dev.describe()
                ),
                e,
            )
        })?;
        Ok(TrackerState::from_arg(dev, &a))
    }

    /// Stops tracking `dev` (refused while a snapshot holds it).
    pub fn detach(&self, dev: impl AsDevice) -> Result<TrackerState> {
        let dev = dev.devnum()?;
        let mut a = tracker_arg(dev);
        sys::tracker_detach(&self.file, &mut a, None)
            .map_err(|e| tracker_err(format!("cannot stop tracking {}", dev.describe()), e))?;
        Ok(TrackerState::from_arg(dev, &a))
    }

    /// Stops tracking `dev` and returns its state and table, to be written at shutdown
    /// (after the filesystems are read-only) and restored at boot.
    pub fn detach_save(&self, dev: impl AsDevice) -> Result<SavedTracker> {
        let dev = dev.devnum()?;
        for _ in 0..3 {
            let blocks = self.read(dev, false)?.blocks;
            let mut table = vec![0u8; table_len(blocks)?];
            let mut a = tracker_arg(dev);
            a.flags = uapi::TRACKER_SAVE;
            match sys::tracker_detach(&self.file, &mut a, Some(&mut table)) {
                // Reattached with a larger table meanwhile: nothing changed, try again.
                Err(Errno::EINVAL) => continue,
                Err(e) => {
                    return Err(tracker_err(
                        format!("cannot stop tracking {}", dev.describe()),
                        e,
                    ))
                }
                Ok(()) => {
                    table.truncate(a.blocks as usize);
                    return Ok(SavedTracker {
                        dev,
                        block_size: a.block_size,
                        device_sectors: a.device_sectors,
                        generation: a.generation,
                        sequence: a.sequence,
                        table,
                        binding: None,
                    });
                }
            }
        }
        Err(KmodError::Invalid(format!(
            "cannot save the tracker of {}: it keeps changing size",
            dev.describe()
        )))
    }

    /// The tracker's state, with its table if `with_table`. The table is read while
    /// writes go on; the state returned is the one the table belongs to.
    pub fn read(&self, dev: impl AsDevice, with_table: bool) -> Result<TrackerState> {
        let dev = dev.devnum()?;
        let what = || format!("cannot read the tracker of {}", dev.describe());
        let read = |table: Option<&mut [u8]>| {
            let mut a = tracker_arg(dev);
            sys::tracker_read(&self.file, &mut a, table).map(|()| a)
        };
        let first = read(None).map_err(|e| tracker_err(what(), e))?;
        if !with_table {
            return Ok(TrackerState::from_arg(dev, &first));
        }
        let mut blocks = first.blocks;
        for _ in 0..5 {
            let mut table = vec![0u8; table_len(blocks)?];
            let a = match read(Some(&mut table)) {
                Err(Errno::EINVAL) => {
                    blocks = read(None).map_err(|e| tracker_err(what(), e))?.blocks;
                    continue;
                }
                r => r.map_err(|e| tracker_err(what(), e))?,
            };
            // A snapshot taken during the read may have reset the table (the sequence
            // passing 255) under the generation reported, or torn the reported pair (the
            // module reads sequence and generation separately): read it again.
            let after = read(None).map_err(|e| tracker_err(what(), e))?;
            if after.generation != a.generation || after.sequence != a.sequence {
                blocks = after.blocks;
                continue;
            }
            table.truncate(a.blocks as usize);
            let mut state = TrackerState::from_arg(dev, &a);
            state.table = Some(table);
            return Ok(state);
        }
        Err(KmodError::Invalid(format!(
            "the tracker of {} kept changing while its table was read; try again",
            dev.describe()
        )))
    }

    /// Every tracker (without tables).
    pub fn trackers(&self) -> Result<Vec<TrackerState>> {
        let mut buf = vec![uapi::TrackerArg::default(); uapi::MAX_LIST as usize];
        let count = sys::tracker_list(&self.file, &mut buf)
            .map_err(|e| KmodError::ioctl("cannot list trackers", e))?;
        buf.truncate(count as usize);
        Ok(buf
            .iter()
            .map(|a| TrackerState::from_arg(DevNum::new(a.major, a.minor), a))
            .collect())
    }

    /// Marks ranges as written now (a change that did not go through the block layer).
    pub fn mark(&self, dev: impl AsDevice, ranges: &[SectorRange]) -> Result<()> {
        let dev = dev.devnum()?;
        if ranges.is_empty() {
            return Err(KmodError::Invalid("no ranges to mark".into()));
        }
        if let Some(r) = ranges.iter().find(|r| r.sectors == 0) {
            return Err(KmodError::Invalid(format!(
                "range at sector {} is empty: give at least one sector",
                r.sector
            )));
        }
        let ranges: Vec<uapi::Range> = ranges
            .iter()
            .map(|r| uapi::Range {
                sector: r.sector,
                sectors: r.sectors,
            })
            .collect();
        // Smaller batches than the module's limit: it copies each into one kmalloc'd buffer.
        for batch in ranges.chunks(MARK_BATCH) {
            sys::tracker_mark(&self.file, dev.major, dev.minor, batch).map_err(|e| {
                let why = if e == Errno::EINVAL {
                    " (a range reaches beyond the end of the device?)"
                } else {
                    ""
                };
                tracker_err(format!("cannot mark ranges of {}{why}", dev.describe()), e)
            })?;
        }
        Ok(())
    }

    // ----------------------------------------------------------------- snapshots

    /// Takes one snapshot of all `devs` at one instant; returns its id. Devices without a
    /// tracker get one (a new generation).
    pub fn create<D: AsDevice>(
        &self,
        devs: &[D],
        store: &[Extent],
        opts: SnapshotOptions,
    ) -> Result<u64> {
        if devs.is_empty() || devs.len() > uapi::MAX_SNAPSHOT_DEVS {
            return Err(KmodError::Invalid(format!(
                "a snapshot holds 1 to {} devices, not {}",
                uapi::MAX_SNAPSHOT_DEVS,
                devs.len()
            )));
        }
        check_store_count(store.len())?;
        let mut nums = Vec::with_capacity(devs.len());
        for d in devs {
            let n = d.devnum()?;
            if nums.contains(&n) {
                return Err(KmodError::Invalid(format!(
                    "{} is named twice",
                    n.describe()
                )));
            }
            nums.push(n);
        }
        let raw: Vec<uapi::DevNum> = nums
            .iter()
            .map(|n| uapi::DevNum {
                major: n.major,
                minor: n.minor,
            })
            .collect();
        let extents: Vec<uapi::Extent> = store.iter().map(|e| e.to_uapi()).collect();
        let flags = if opts.no_freeze {
            uapi::CREATE_NO_FREEZE
        } else {
            0
        };
        sys::snapshot_create(
            &self.file,
            &raw,
            &extents,
            flags,
            opts.chunk_sectors,
            opts.low_water_sectors,
        )
        .map_err(|e| {
            let names: Vec<String> = nums.iter().map(|n| n.describe()).collect();
            let why = match e {
                Errno::EBUSY => {
                    " (a device is held by another snapshot, or its filesystem could not be frozen)"
                }
                Errno::EINVAL => {
                    " (bad chunk size, a store extent outside its device or overlapping another, or two devices overlapping: a partition and its whole disk)"
                }
                _ => "",
            };
            KmodError::ioctl(format!("cannot snapshot {}{why}", names.join(", ")), e)
        })
    }

    /// Ends a snapshot: its images go away, its store is free. Trackers stay attached.
    pub fn destroy(&self, id: u64) -> Result<()> {
        sys::snapshot_destroy(&self.file, id)
            .map_err(|e| snapshot_err(format!("cannot destroy snapshot {id}"), e))
    }

    pub fn info(&self, id: u64) -> Result<SnapshotInfo> {
        let mut devs = vec![uapi::SnapshotDev::default(); uapi::MAX_SNAPSHOT_DEVS];
        let a = sys::snapshot_info(&self.file, id, &mut devs)
            .map_err(|e| snapshot_err(format!("no information on snapshot {id}"), e))?;
        devs.truncate((a.dev_count as usize).min(uapi::MAX_SNAPSHOT_DEVS));
        Ok(SnapshotInfo {
            id,
            state: match a.state {
                uapi::STATE_ACTIVE => SnapshotState::Active,
                uapi::STATE_FAILED => SnapshotState::Failed,
                s => SnapshotState::Unknown(s),
            },
            error: a.error,
            store_sectors: a.store_sectors,
            store_used_sectors: a.store_used_sectors,
            low_water_sectors: a.low_water_sectors,
            chunk_sectors: a.chunk_sectors,
            copied_chunks: a.copied_chunks,
            created_ns: a.created_ns,
            devs: devs
                .iter()
                .enumerate()
                .map(|(i, d)| SnapshotDev {
                    dev: DevNum::new(d.major, d.minor),
                    image: DevNum::new(d.image_major, d.image_minor),
                    image_path: image_path(id, i),
                    sectors: d.sectors,
                    generation: d.generation,
                    sequence: d.sequence,
                })
                .collect(),
        })
    }

    /// The ids of every snapshot.
    pub fn snapshots(&self) -> Result<Vec<u64>> {
        let mut ids = vec![0u64; uapi::MAX_LIST as usize];
        let count = sys::snapshot_list(&self.file, &mut ids)
            .map_err(|e| KmodError::ioctl("cannot list snapshots", e))?;
        ids.truncate(count as usize);
        Ok(ids)
    }

    /// Adds extents to a live snapshot's store.
    pub fn store_add(&self, id: u64, extents: &[Extent]) -> Result<()> {
        check_store_count(extents.len())?;
        let raw: Vec<uapi::Extent> = extents.iter().map(|e| e.to_uapi()).collect();
        sys::store_add(&self.file, id, &raw).map_err(|e| {
            let why = if e == Errno::EIO {
                " (the snapshot has failed already)"
            } else {
                ""
            };
            snapshot_err(format!("cannot add to the store of snapshot {id}{why}"), e)
        })
    }

    /// The oldest queued event, waiting up to `timeout`; `None` if none came (or a signal
    /// arrived). Events of every snapshot share one queue and each goes to one waiter.
    /// Waits up to `timeout` for the oldest event of snapshot `id` (0: of any snapshot).
    pub fn wait_event(&self, timeout: Duration, id: u64) -> Result<Option<Event>> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let e = match sys::wait_event(&self.file, ms, id) {
            Err(Errno::EINTR) => return Ok(None),
            r => r.map_err(|e| KmodError::ioctl("cannot wait for bksnap events", e))?,
        };
        let kind = match e.kind {
            uapi::EVENT_NONE => return Ok(None),
            uapi::EVENT_LOW_SPACE => EventKind::LowSpace,
            uapi::EVENT_FAILED => EventKind::Failed,
            k => EventKind::Unknown(k),
        };
        Ok(Some(Event {
            kind,
            snapshot_id: e.snapshot_id,
            error: e.error,
            store_sectors: e.store_sectors,
            store_used_sectors: e.store_used_sectors,
        }))
    }
}

/// Ranges per TRACKER_MARK request (64 KiB of ranges).
const MARK_BATCH: usize = 4096;
const _: () = assert!(MARK_BATCH <= uapi::MAX_MARK_RANGES);

fn tracker_arg(dev: DevNum) -> uapi::TrackerArg {
    uapi::TrackerArg {
        major: dev.major,
        minor: dev.minor,
        ..Default::default()
    }
}

/// A failed tracker request, with what the errno means for trackers.
fn tracker_err(what: String, e: Errno) -> KmodError {
    let why = match e {
        Errno::ENOENT => " (the device is not tracked)",
        Errno::EEXIST => " (the device is tracked already)",
        Errno::EBUSY => " (a snapshot holds the device: destroy it first)",
        _ => "",
    };
    KmodError::ioctl(format!("{what}{why}"), e)
}

fn snapshot_err(what: String, e: Errno) -> KmodError {
    let why = if e == Errno::ENOENT {
        " (no such snapshot)"
    } else {
        ""
    };
    KmodError::ioctl(format!("{what}{why}"), e)
}

fn table_len(blocks: u64) -> Result<usize> {
    if blocks > uapi::MAX_BLOCKS {
        return Err(KmodError::Invalid(format!(
            "the module reports a table of {blocks} blocks, more than the limit {}",
            uapi::MAX_BLOCKS
        )));
    }
    Ok(blocks as usize)
}

fn check_store_count(n: usize) -> Result<()> {
    if n == 0 || n > uapi::MAX_STORE_EXTENTS {
        return Err(KmodError::Invalid(format!(
            "a store is given as 1 to {} extents at a time, not {n}: use a less fragmented \
             filesystem or a smaller size",
            uapi::MAX_STORE_EXTENTS
        )));
    }
    Ok(())
}
