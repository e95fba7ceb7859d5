// SPDX-License-Identifier: GPL-2.0
//! Copy-on-write snapshots and their difference store.
//!
//! Before a write reaches a device held by a snapshot, the old data of every chunk it
//! touches that was not copied yet is read and written to the difference store (runs of
//! adjacent chunks in one read and one write); the chunk is then recorded in the map and
//! never copied again. The snapshot image reads copied chunks from the store and every
//! other chunk from the device itself. The module never writes to the device: when the
//! store is full or fails, the snapshot is marked failed (its image returns errors) and
//! writes go on untouched.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use kernel::prelude::*;
use kernel::rbtree::RBTree;
use kernel::sync::{new_mutex, Arc, Mutex};

use crate::sys::{BdevFile, Bio, Image, IoBuffer};
use crate::tracker::Tracker;
use crate::uapi;
use crate::Events;

/// Chunks copied with one read and one write at most (1 MiB at the default chunk size).
const MAX_RUN_BYTES: u64 = 1 << 20;
/// A store write that takes longer fails the snapshot rather than the server.
const IO_TIMEOUT_MS: u32 = 30_000;
pub(crate) const DEFAULT_CHUNK_SECTORS: u32 = 128;

pub(crate) struct StoreExtent {
    major: u32,
    minor: u32,
    file: BdevFile,
    sector: u64,
    sectors: u64,
}

/// Where a copied chunk lives: an extent of the store and a sector on its device.
#[derive(Clone, Copy)]
struct Loc {
    extent: usize,
    sector: u64,
}

struct Store {
    extents: KVec<Arc<StoreExtent>>,
    /// Allocation cursor: extent index and sectors used in it.
    extent: usize,
    offset: u64,
    total: u64,
    used: u64,
    low_water: u64,
    low_reported: bool,
}

impl Store {
    /// Allocates up to `chunks` contiguous chunks of `chunk_sectors`; returns the first
    /// one's location and how many were allocated (0: full).
    fn alloc(&mut self, chunk_sectors: u64, chunks: u64) -> (Loc, u64) {
        while self.extent < self.extents.len() {
            let ext = &self.extents[self.extent];
            let room = (ext.sectors - self.offset) / chunk_sectors;
            if room == 0 {
                // The tail of an extent smaller than a chunk is not used.
                self.used += ext.sectors - self.offset;
                self.extent += 1;
                self.offset = 0;
                continue;
            }
            let n = room.min(chunks);
            let loc = Loc { extent: self.extent, sector: ext.sector + self.offset };
            self.offset += n * chunk_sectors;
            self.used += n * chunk_sectors;
            return (loc, n);
        }
        (Loc { extent: 0, sector: 0 }, 0)
    }
}

/// What the devices of one snapshot share: its store and its state.
#[pin_data]
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) chunk_sectors: u32,
    pub(crate) created_ns: u64,
    state: AtomicU32,
    error: AtomicI32,
    copied: AtomicU64,
    #[pin]
    store: Mutex<Store>,
    events: Arc<Events>,
}

impl Shared {
    pub(crate) fn new(
        id: u64,
        chunk_sectors: u32,
        low_water: u64,
        extents: KVec<Arc<StoreExtent>>,
        events: Arc<Events>,
        created_ns: u64,
    ) -> Result<Arc<Shared>> {
        let total = extents.iter().map(|e| e.sectors).sum();
        Ok(Arc::pin_init(
            pin_init!(Shared {
                id,
                chunk_sectors,
                created_ns,
                state: AtomicU32::new(uapi::STATE_ACTIVE),
                error: AtomicI32::new(0),
                copied: AtomicU64::new(0),
                store <- new_mutex!(Store {
                    extents,
                    extent: 0,
                    offset: 0,
                    total,
                    used: 0,
                    low_water,
                    low_reported: false,
                }, "bksnap_store"),
                events,
            }),
            GFP_KERNEL,
        )?)
    }

    pub(crate) fn failed(&self) -> bool {
        self.state.load(Ordering::SeqCst) == uapi::STATE_FAILED
    }

    /// Marks the snapshot failed (once) and reports it.
    pub(crate) fn fail(&self, err: Error) {
        if self.state.swap(uapi::STATE_FAILED, Ordering::SeqCst) == uapi::STATE_FAILED {
            return;
        }
        self.error.store(err.to_errno(), Ordering::SeqCst);
        let (total, used) = self.space();
        pr_warn!(
            "bksnap: snapshot {} failed ({:?}); writes continue, its images return errors\n",
            self.id,
            err
        );
        self.events.push(uapi::EVENT_FAILED, self.id, err.to_errno(), total, used);
    }

    pub(crate) fn space(&self) -> (u64, u64) {
        let store = self.store.lock();
        (store.total, store.used)
    }

    pub(crate) fn info(&self, out: &mut uapi::InfoArg) {
        let store = self.store.lock();
        out.state = self.state.load(Ordering::SeqCst);
        out.error = self.error.load(Ordering::SeqCst);
        out.store_sectors = store.total;
        out.store_used_sectors = store.used;
        out.low_water_sectors = store.low_water;
        out.chunk_sectors = self.chunk_sectors;
        out.copied_chunks = self.copied.load(Ordering::Relaxed);
        out.created_ns = self.created_ns;
    }

    /// Adds store space (extents that overlap none already in the store); re-arms the
    /// low-space event.
    pub(crate) fn add_extents(&self, extents: KVec<Arc<StoreExtent>>, list: &[uapi::Extent]) -> Result {
        if self.failed() {
            return Err(EIO);
        }
        let mut store = self.store.lock();
        for old in store.extents.iter() {
            if list.iter().any(|e| {
                e.major == old.major
                    && e.minor == old.minor
                    && e.sector < old.sector + old.sectors
                    && old.sector < e.sector + e.sectors
            }) {
                return Err(EINVAL);
            }
        }
        store.extents.reserve(extents.len(), GFP_KERNEL)?;
        for e in extents {
            store.total += e.sectors;
            store.extents.push(e, GFP_KERNEL)?;
        }
        store.low_reported = false;
        Ok(())
    }

    fn alloc(&self, chunks: u64) -> Option<(Loc, u64, Arc<StoreExtent>)> {
        let mut store = self.store.lock();
        let (loc, n) = store.alloc(u64::from(self.chunk_sectors), chunks);
        let low = !store.low_reported && store.total - store.used <= store.low_water;
        if low {
            store.low_reported = true;
        }
        let (total, used) = (store.total, store.used);
        let ext = if n > 0 { Some(store.extents[loc.extent].clone()) } else { None };
        drop(store);
        if low {
            self.events.push(uapi::EVENT_LOW_SPACE, self.id, 0, total, used);
        }
        ext.map(|e| (loc, n, e))
    }

    fn extent(&self, index: usize) -> Arc<StoreExtent> {
        self.store.lock().extents[index].clone()
    }
}

/// Opens the store extents a caller names, checking each lies inside its device.
pub(crate) fn open_extents(list: &[uapi::Extent]) -> Result<KVec<Arc<StoreExtent>>> {
    let mut out = KVec::with_capacity(list.len(), GFP_KERNEL)?;
    for e in list {
        if e.reserved != 0 || e.sectors == 0 {
            return Err(EINVAL);
        }
        let file = BdevFile::open(e.major, e.minor, true)?;
        if e.sector.checked_add(e.sectors).map_or(true, |end| end > file.sectors()) {
            return Err(EINVAL);
        }
        out.push(
            Arc::new(
                StoreExtent { major: e.major, minor: e.minor, file, sector: e.sector, sectors: e.sectors },
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
    }
    // No two extents of one device may overlap: the store would overwrite itself.
    for (i, a) in list.iter().enumerate() {
        for b in &list[i + 1..] {
            if a.major == b.major
                && a.minor == b.minor
                && a.sector < b.sector + b.sectors
                && b.sector < a.sector + a.sectors
            {
                return Err(EINVAL);
            }
        }
    }
    Ok(out)
}

/// One device of a snapshot.
#[pin_data]
pub(crate) struct SnapDev {
    /// The image disk and the copy-on-write lock. First field: dropped (removing the disk
    /// and waiting for its reads, which use the rest) before anything else.
    image: Image,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) index: u32,
    pub(crate) sectors: u64,
    chunk_shift: u32,
    /// Copied chunks: chunk number -> location in the store.
    #[pin]
    map: Mutex<RBTree<u64, Loc>>,
    /// The image disk's device number, once it exists (after activation).
    #[pin]
    image_dev: Mutex<(u32, u32)>,
    pub(crate) sequence: AtomicU64,
    #[pin]
    pub(crate) generation: Mutex<[u8; 16]>,
}

impl SnapDev {
    pub(crate) fn new(shared: Arc<Shared>, tracker: Arc<Tracker>, index: u32) -> Result<Arc<SnapDev>> {
        let sectors = tracker.sectors;
        let chunk_shift = shared.chunk_sectors.trailing_zeros();
        // The image (its lock) exists before activation: copy-on-write needs it from the
        // first write on; its disk comes later.
        let image = Image::new()?;
        let dev = Arc::pin_init(
            pin_init!(SnapDev {
                image,
                shared,
                tracker,
                index,
                sectors,
                chunk_shift,
                map <- new_mutex!(RBTree::new(), "bksnap_map"),
                image_dev <- new_mutex!((0, 0), "bksnap_image_dev"),
                sequence: AtomicU64::new(0),
                generation <- new_mutex!([0; 16], "bksnap_generation"),
            }),
            GFP_KERNEL,
        )?;
        Ok(dev)
    }

    /// Creates the read-only image disk; returns its device number.
    pub(crate) fn add_image(&self) -> Result<(u32, u32)> {
        let (major, minor) = self.image.add_disk(self, &self.tracker.file, self.shared.id, self.index)?;
        *self.image_dev.lock() = (major, minor);
        Ok((major, minor))
    }

    pub(crate) fn image_dev(&self) -> (u32, u32) {
        *self.image_dev.lock()
    }

    fn chunks(&self, sector: u64, sectors: u64) -> (u64, u64) {
        let end = (sector + sectors).min(self.sectors);
        (sector >> self.chunk_shift, (end - 1) >> self.chunk_shift)
    }

    /// Whether a write to the range would have to copy something first.
    pub(crate) fn needs_copy(&self, sector: u64, sectors: u64) -> bool {
        if self.shared.failed() {
            return false;
        }
        let (first, last) = self.chunks(sector, sectors);
        let map = self.map.lock();
        (first..=last).any(|c| map.get(&c).is_none())
    }

    /// Copies every chunk of the range not copied yet into the store.
    pub(crate) fn copy_on_write(&self, sector: u64, sectors: u64) {
        let (first, last) = self.chunks(sector, sectors);
        let chunk_sectors = u64::from(self.shared.chunk_sectors);
        let max_run = (MAX_RUN_BYTES / (chunk_sectors * 512)).max(1);
        let mut c = first;
        while c <= last {
            if self.shared.failed() {
                return;
            }
            let _guard = self.image.write_lock();
            // Under the lock: the first chunk not copied, and the run after it.
            let map = self.map.lock();
            while c <= last && map.get(&c).is_some() {
                c += 1;
            }
            if c > last {
                return;
            }
            let mut run = 1;
            while run < max_run && c + run <= last && map.get(&(c + run)).is_none() {
                run += 1;
            }
            drop(map);
            let Some((loc, n, ext)) = self.shared.alloc(run) else {
                self.shared.fail(ENOSPC);
                return;
            };
            if let Err(e) = self.copy(c, n, loc, &ext) {
                self.shared.fail(e);
                return;
            }
            c += n;
        }
    }

    /// Copies chunks `[c, c + n)` to `loc` and records them.
    fn copy(&self, c: u64, n: u64, loc: Loc, ext: &StoreExtent) -> Result {
        let chunk_sectors = u64::from(self.shared.chunk_sectors);
        let start = c << self.chunk_shift;
        // The device's last chunk may be short.
        let sectors = ((c + n) << self.chunk_shift).min(self.sectors) - start;
        let len = (sectors * 512) as u32;
        let mut buf = IoBuffer::new(len)?;
        self.tracker.file.rw(start, &mut buf, len, false, IO_TIMEOUT_MS)?;
        ext.file.rw(loc.sector, &mut buf, len, true, IO_TIMEOUT_MS)?;
        ext.file.mark_written(loc.sector, sectors);
        let mut map = self.map.lock();
        for i in 0..n {
            let at = Loc { extent: loc.extent, sector: loc.sector + i * chunk_sectors };
            map.try_create_and_insert(c + i, at, GFP_KERNEL)?;
        }
        self.shared.copied.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Serves a read of the image: copied chunks from the store, the rest from the device.
    pub(crate) fn image_read(&self, bio: &Bio, sector: u64, sectors: u64) -> Result {
        if sector.checked_add(sectors).map_or(true, |e| e > self.sectors) {
            return Err(EIO);
        }
        let chunk_sectors = u64::from(self.shared.chunk_sectors);
        let mut done = 0;
        while done < sectors {
            if self.shared.failed() {
                return Err(EIO);
            }
            let at = sector + done;
            let c = at >> self.chunk_shift;
            let in_chunk = at - (c << self.chunk_shift);
            let guard = self.image.read_lock();
            let loc = self.map.lock().get(&c).copied();
            let span = match loc {
                Some(loc) => {
                    let span = (chunk_sectors - in_chunk).min(sectors - done);
                    let ext = self.shared.extent(loc.extent);
                    bio.read_span(done, span, &ext.file, loc.sector + in_chunk)?;
                    span
                }
                None => {
                    // This chunk and the following ones not copied: one read of the device.
                    let mut end = ((c + 1) << self.chunk_shift).min(sector + sectors);
                    {
                        let map = self.map.lock();
                        while end < sector + sectors && map.get(&(end >> self.chunk_shift)).is_none()
                        {
                            end = (((end >> self.chunk_shift) + 1) << self.chunk_shift).min(sector + sectors);
                        }
                    }
                    let span = end - at;
                    bio.read_span(done, span, &self.tracker.file, at)?;
                    span
                }
            };
            drop(guard);
            done += span;
        }
        // A failure during the read may have let a write through uncopied.
        if self.shared.failed() {
            return Err(EIO);
        }
        Ok(())
    }
}
