// SPDX-License-Identifier: GPL-2.0
//! Copy-on-write snapshots and their difference store.
//!
//! Before a write reaches a device held by a snapshot, the old data of every chunk it
//! touches that was not copied yet is read into memory (runs of adjacent chunks in one
//! read) and the chunk recorded in the map as in flight; the write then goes on while a
//! worker writes the old data to the difference store and records where. A chunk is never
//! copied twice. The snapshot image reads copied chunks from the store (waiting for those
//! in flight) and every other chunk from the device itself. Old data held in memory is
//! bounded ([`MAX_IN_FLIGHT_BYTES`]); beyond it the store write is made before the write
//! goes on. The module never writes to the device: when the
//! store is full or fails, the snapshot is marked failed (its image returns errors) and
//! writes go on untouched.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use kernel::prelude::*;
use kernel::rbtree::RBTree;
use kernel::sync::{new_condvar, new_mutex, Arc, CondVar, Mutex};

use crate::sys::{self, BdevFile, Bio, Image, IoBuffer, Span};
use crate::tracker::Tracker;
use crate::uapi;
use crate::Events;

/// Chunks copied with one read and one write at most (1 MiB at the default chunk size).
const MAX_RUN_BYTES: u64 = 1 << 20;
/// Old data read but not yet in the store, per snapshot, at most.
pub(crate) const MAX_IN_FLIGHT_BYTES: u64 = 32 << 20;
/// A store write that takes longer fails the snapshot rather than the server.
const IO_TIMEOUT_MS: u32 = 30_000;
pub(crate) const DEFAULT_CHUNK_SECTORS: u32 = 128;

pub(crate) struct StoreExtent {
    /// Where the extent lies on its whole disk (a partition's extent and its disk's can
    /// overlap).
    span: Span,
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

/// A copied chunk, as the map records it.
#[derive(Clone, Copy)]
enum Saved {
    /// In the store.
    Stored(Loc),
    /// Read into memory; its store write has not completed yet.
    InFlight,
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
            let loc = Loc {
                extent: self.extent,
                sector: ext.sector + self.offset,
            };
            self.offset += n * chunk_sectors;
            self.used += n * chunk_sectors;
            return (loc, n);
        }
        (
            Loc {
                extent: 0,
                sector: 0,
            },
            0,
        )
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
    /// Bytes of old data read but not yet written to the store.
    in_flight: AtomicU64,
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
        Arc::pin_init(
            pin_init!(Shared {
                id,
                chunk_sectors,
                created_ns,
                state: AtomicU32::new(uapi::STATE_ACTIVE),
                error: AtomicI32::new(0),
                copied: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
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
        )
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
        self.events
            .push(uapi::EVENT_FAILED, self.id, err.to_errno(), total, used);
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

    /// Adds store space (extents that overlap none already in the store, on their disk);
    /// re-arms the low-space event.
    pub(crate) fn add_extents(&self, extents: KVec<Arc<StoreExtent>>) -> Result {
        if self.failed() {
            return Err(EIO);
        }
        let mut store = self.store.lock();
        for old in store.extents.iter() {
            if extents.iter().any(|e| e.span.overlaps(&old.span)) {
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
        let ext = if n > 0 {
            Some(store.extents[loc.extent].clone())
        } else {
            None
        };
        drop(store);
        if low {
            self.events
                .push(uapi::EVENT_LOW_SPACE, self.id, 0, total, used);
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
        if e.sector
            .checked_add(e.sectors)
            .map_or(true, |end| end > file.sectors())
        {
            return Err(EINVAL);
        }
        out.push(
            Arc::new(
                StoreExtent {
                    span: file.span(e.sector, e.sectors),
                    file,
                    sector: e.sector,
                    sectors: e.sectors,
                },
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
    }
    // No two extents may overlap on their disk (an extent of a partition and one of its
    // whole disk included): the store would overwrite itself.
    for (i, a) in out.iter().enumerate() {
        if out[i + 1..].iter().any(|b| a.span.overlaps(&b.span)) {
            return Err(EINVAL);
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
    /// Copied chunks: chunk number -> where the old data is.
    #[pin]
    map: Mutex<RBTree<u64, Saved>>,
    /// Signalled (map lock held just before) when in-flight chunks reach the store or the
    /// snapshot fails.
    #[pin]
    stored: CondVar,
    /// The image disk's device number, once it exists (after activation).
    #[pin]
    image_dev: Mutex<(u32, u32)>,
    pub(crate) sequence: AtomicU64,
    #[pin]
    pub(crate) generation: Mutex<[u8; 16]>,
}

impl SnapDev {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tracker: Arc<Tracker>,
        index: u32,
    ) -> Result<Arc<SnapDev>> {
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
                stored <- new_condvar!("bksnap_stored"),
                image_dev <- new_mutex!((0, 0), "bksnap_image_dev"),
                sequence: AtomicU64::new(0),
                generation <- new_mutex!([0; 16], "bksnap_generation"),
            }),
            GFP_KERNEL,
        )?;
        Ok(dev)
    }

    /// Creates the read-only image disk; returns its device number.
    pub(crate) fn add_image(this: &Arc<SnapDev>) -> Result<(u32, u32)> {
        let (major, minor) = Image::add_disk(this, &this.tracker.file, this.shared.id, this.index)?;
        *this.image_dev.lock() = (major, minor);
        Ok((major, minor))
    }

    /// The image this device's disk (once added) reads through.
    pub(crate) fn image(&self) -> &Image {
        &self.image
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

    /// Copies every chunk of the range not copied yet (see the module comment).
    pub(crate) fn copy_on_write(this: &Arc<SnapDev>, sector: u64, sectors: u64) {
        let (first, last) = this.chunks(sector, sectors);
        let chunk_sectors = u64::from(this.shared.chunk_sectors);
        let max_run = (MAX_RUN_BYTES / (chunk_sectors * 512)).max(1);
        let mut c = first;
        while c <= last {
            if this.shared.failed() {
                return;
            }
            let _guard = this.image.write_lock();
            // Under the lock: the first chunk not copied, and the run after it.
            let map = this.map.lock();
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
            let Some((loc, n, ext)) = this.shared.alloc(run) else {
                this.shared.fail(ENOSPC);
                return;
            };
            if let Err(e) = Self::copy(this, c, n, loc, ext) {
                this.shared.fail(e);
                this.wake();
                return;
            }
            c += n;
        }
    }

    /// Reads chunks `[c, c + n)` and has them written to `loc`: by a worker when the
    /// in-flight limit allows (the chunks are recorded as in flight meanwhile), else now.
    fn copy(this: &Arc<SnapDev>, c: u64, n: u64, loc: Loc, ext: Arc<StoreExtent>) -> Result {
        let start = c << this.chunk_shift;
        // The device's last chunk may be short.
        let sectors = ((c + n) << this.chunk_shift).min(this.sectors) - start;
        let len = (sectors * 512) as u32;
        let mut buf = IoBuffer::new(len)?;
        this.tracker
            .file
            .rw(start, &mut buf, len, false, IO_TIMEOUT_MS)?;
        this.shared.copied.fetch_add(n, Ordering::Relaxed);
        let item = CowWrite {
            dev: this.clone(),
            c,
            n,
            loc,
            ext,
            buf,
            len,
        };
        let held = this
            .shared
            .in_flight
            .fetch_add(u64::from(len), Ordering::Relaxed);
        if held + u64::from(len) > MAX_IN_FLIGHT_BYTES {
            this.shared
                .in_flight
                .fetch_sub(u64::from(len), Ordering::Relaxed);
            return item.store();
        }
        let queued = (|| -> Result<KBox<CowWrite>> {
            let mut map = this.map.lock();
            for i in 0..n {
                map.try_create_and_insert(c + i, Saved::InFlight, GFP_KERNEL)?;
            }
            drop(map);
            Ok(KBox::new(item, GFP_KERNEL)?)
        })();
        match queued {
            Ok(item) => {
                if let Err(item) = sys::cow_queue(item) {
                    KBox::into_inner(item).run();
                }
                Ok(())
            }
            Err(e) => {
                this.shared
                    .in_flight
                    .fetch_sub(u64::from(len), Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Wakes image reads waiting for in-flight chunks. The map lock is taken first so a
    /// reader that saw the old state under it is already asleep.
    fn wake(&self) {
        drop(self.map.lock());
        self.stored.notify_all();
    }

    /// Serves a read of the image: copied chunks from the store, the rest from the device.
    pub(crate) fn image_read(&self, bio: &Bio, sector: u64, sectors: u64) -> Result {
        if sector
            .checked_add(sectors)
            .map_or(true, |e| e > self.sectors)
        {
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
            // Where the chunk's old data is: in the store, or (None) still on the device.
            let stored = {
                let mut map = self.map.lock();
                loop {
                    match map.get(&c).copied() {
                        Some(Saved::InFlight) if !self.shared.failed() => {
                            self.stored.wait(&mut map)
                        }
                        Some(Saved::InFlight) => return Err(EIO),
                        Some(Saved::Stored(loc)) => break Some(loc),
                        None => break None,
                    }
                }
            };
            let span = match stored {
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
                        while end < sector + sectors
                            && map.get(&(end >> self.chunk_shift)).is_none()
                        {
                            end = (((end >> self.chunk_shift) + 1) << self.chunk_shift)
                                .min(sector + sectors);
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

/// Old data of chunks `[c, c + n)` read into memory, to be written to the store at `loc`.
pub(crate) struct CowWrite {
    dev: Arc<SnapDev>,
    c: u64,
    n: u64,
    loc: Loc,
    ext: Arc<StoreExtent>,
    buf: IoBuffer,
    len: u32,
}

impl CowWrite {
    /// Runs on the copy-on-write workqueue: writes, records, wakes waiting image reads.
    pub(crate) fn run(self) {
        let dev = self.dev.clone();
        let len = u64::from(self.len);
        if let Err(e) = self.store() {
            dev.shared.fail(e);
        }
        dev.shared.in_flight.fetch_sub(len, Ordering::Relaxed);
        dev.wake();
    }

    /// Writes the old data to the store and records the chunks as stored.
    fn store(mut self) -> Result {
        let chunk_sectors = u64::from(self.dev.shared.chunk_sectors);
        let sectors = u64::from(self.len) / 512;
        self.ext.file.rw(
            self.loc.sector,
            &mut self.buf,
            self.len,
            true,
            IO_TIMEOUT_MS,
        )?;
        self.ext.file.mark_written(self.loc.sector, sectors);
        let mut map = self.dev.map.lock();
        for i in 0..self.n {
            let at = Loc {
                extent: self.loc.extent,
                sector: self.loc.sector + i * chunk_sectors,
            };
            map.try_create_and_insert(self.c + i, Saved::Stored(at), GFP_KERNEL)?;
        }
        Ok(())
    }
}
