// SPDX-License-Identifier: GPL-2.0
//! Changed-block tracking of one block device.
//!
//! One byte per tracking block holds the sequence number that was active when the block
//! was last written. Taking a snapshot of the device ends sequence `s` (the snapshot's
//! number) and starts `s + 1`; so the blocks changed since snapshot `s` are exactly those
//! whose byte is greater than `s`. Sequences run from 1 to 255; the table is reset (zeroed,
//! with a new generation id and sequence 1) rather than wrapped, and a reader that finds
//! another generation than it recorded must not trust the table.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use kernel::prelude::*;
use kernel::sync::{new_mutex, new_spinlock, Arc, Mutex, SpinLock};

use crate::snapshot::SnapDev;
use crate::sys::{random_bytes, BdevFile, ModuleRef, Slot, SlotGuard, Span};

/// The largest table the automatic block size allows: 4 MiB (one byte per block).
const AUTO_MAX_BLOCKS: u64 = 1 << 22;
/// The largest table an explicit block size may ask for.
const MAX_BLOCKS: u64 = 1 << 26;
const MIN_AUTO_SHIFT: u32 = 12;
const MAX_SEQUENCE: u64 = 255;

pub(crate) struct Saved<'a> {
    pub(crate) generation: [u8; 16],
    pub(crate) sequence: u64,
    pub(crate) table: &'a [u8],
}

#[pin_data]
pub(crate) struct Tracker {
    /// Set once registered with the hook; `None` again after detach. The slot holds a
    /// reference to the tracker, so an attached tracker lives until it is detached; a
    /// [`SlotGuard`] holds one to the slot, so the slot lives until writes are let go.
    #[pin]
    slot: Mutex<Option<Arc<Slot>>>,
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) file: BdevFile,
    pub(crate) sectors: u64,
    /// log2 of the block size in sectors.
    block_shift: u32,
    table: KVVec<AtomicU8>,
    /// The active sequence: writes now are marked with it. Changed only with the slot
    /// locked (no write is inside the hook then).
    sequence: AtomicU64,
    writes: AtomicU64,
    #[pin]
    generation: Mutex<[u8; 16]>,
    /// The snapshot holding this device, if any (changed only with the slot locked).
    #[pin]
    snap: SpinLock<Option<Arc<SnapDev>>>,
    _module: ModuleRef,
}

impl Tracker {
    /// Attaches a tracker. `block_size` 0 picks one (at least 4 KiB, table at most 4 MiB);
    /// `saved` restores a table saved at a clean detach.
    pub(crate) fn attach(
        major: u32,
        minor: u32,
        block_size: u32,
        saved: Option<Saved<'_>>,
    ) -> Result<Arc<Tracker>> {
        let file = BdevFile::open(major, minor, false)?;
        let sectors = file.sectors();
        if sectors == 0 {
            return Err(EINVAL);
        }
        let min_shift = (file.block_size().max(512) / 512).trailing_zeros();
        let block_shift = if block_size == 0 {
            let mut shift = MIN_AUTO_SHIFT.max(min_shift + 9) - 9;
            while sectors.div_ceil(1 << shift) > AUTO_MAX_BLOCKS {
                shift += 1;
            }
            shift
        } else {
            if !block_size.is_power_of_two() || !(512..=1 << 30).contains(&block_size) {
                return Err(EINVAL);
            }
            let shift = block_size.trailing_zeros() - 9;
            if shift < min_shift || sectors.div_ceil(1 << shift) > MAX_BLOCKS {
                return Err(EINVAL);
            }
            shift
        };
        let blocks = sectors.div_ceil(1 << block_shift) as usize;

        let mut generation = [0u8; 16];
        let mut sequence = 1;
        let mut table = KVVec::with_capacity(blocks, GFP_KERNEL)?;
        match saved {
            Some(saved) => {
                if saved.table.len() != blocks
                    || saved.sequence == 0
                    || saved.sequence > MAX_SEQUENCE
                    || saved.generation == [0; 16]
                    || saved.table.iter().any(|b| u64::from(*b) > saved.sequence)
                {
                    return Err(EINVAL);
                }
                for b in saved.table {
                    table.push(AtomicU8::new(*b), GFP_KERNEL)?;
                }
                generation = saved.generation;
                sequence = saved.sequence;
            }
            None => {
                for _ in 0..blocks {
                    table.push(AtomicU8::new(0), GFP_KERNEL)?;
                }
                new_generation(&mut generation);
            }
        }

        let tracker = Arc::pin_init(
            pin_init!(Tracker {
                slot <- new_mutex!(None, "bksnap_tracker_slot"),
                major,
                minor,
                file,
                sectors,
                block_shift,
                table,
                sequence: AtomicU64::new(sequence),
                writes: AtomicU64::new(0),
                generation <- new_mutex!(generation, "bksnap_tracker_generation"),
                snap <- new_spinlock!(None, "bksnap_tracker_snap"),
                _module: ModuleRef::get(),
            }),
            GFP_KERNEL,
        )?;
        let slot = Arc::new(Slot::add(&tracker.file, tracker.clone())?, GFP_KERNEL)?;
        *tracker.slot.lock() = Some(slot);
        Ok(tracker)
    }

    /// Stops tracking: no write reaches this tracker once this returns. The caller holds
    /// the module's `create` lock, under which every [`SlotGuard`] is taken and dropped, so
    /// the reference dropped here is the slot's last and the slot is removed now.
    pub(crate) fn detach(&self) {
        let slot = self.slot.lock().take();
        drop(slot);
    }

    /// Where the whole device lies on its disk.
    pub(crate) fn span(&self) -> Span {
        self.file.span(0, self.sectors)
    }

    pub(crate) fn block_size(&self) -> u32 {
        512 << self.block_shift
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.table.len() as u64
    }

    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn snapshot(&self) -> Option<Arc<SnapDev>> {
        self.snap.lock().clone()
    }

    /// Holds writes to the device back until the guard is dropped (see [`Slot::lock`]);
    /// `ENODEV` once detached.
    pub(crate) fn block_writes(&self) -> Result<SlotGuard> {
        let slot = self.slot.lock().clone().ok_or(ENODEV)?;
        Ok(Slot::lock(&slot))
    }

    /// The slot index, for locking several trackers in one order.
    pub(crate) fn slot_index(&self) -> i32 {
        self.slot.lock().as_ref().map_or(-1, |s| s.index())
    }

    /// Called by the hook for every write to `[sector, sector + sectors)` of the device,
    /// before it is submitted. Returns 1 if it would have to sleep and `may_block` is false
    /// (the write is then retried from a worker), 0 otherwise.
    pub(crate) fn write(&self, sector: u64, sectors: u64, may_block: bool) -> i32 {
        if sectors == 0 || sector >= self.sectors {
            return 0;
        }
        let snap = self.snap.lock().clone();
        if let Some(dev) = &snap {
            if !may_block && dev.needs_copy(sector, sectors) {
                return 1;
            }
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.mark(sector, sectors);
        if let Some(dev) = snap {
            SnapDev::copy_on_write(&dev, sector, sectors);
        }
        0
    }

    /// Marks a range the module itself wrote (a difference store on this device).
    pub(crate) fn mark_written(&self, sector: u64, sectors: u64) {
        if sectors > 0 && sector < self.sectors {
            self.mark(sector, sectors);
        }
    }

    fn mark(&self, sector: u64, sectors: u64) {
        let seq = self.sequence.load(Ordering::Acquire) as u8;
        let end = (sector + sectors).min(self.sectors);
        let first = (sector >> self.block_shift) as usize;
        let last = ((end - 1) >> self.block_shift) as usize;
        for b in &self.table[first..=last] {
            b.store(seq, Ordering::Relaxed);
        }
    }

    /// Marks ranges dirty on behalf of userspace (a change it knows of but did not go
    /// through the block layer).
    pub(crate) fn mark_ranges(&self, ranges: &[(u64, u64)]) -> Result {
        for (sector, sectors) in ranges {
            if *sectors == 0
                || sector
                    .checked_add(*sectors)
                    .map_or(true, |e| e > self.sectors)
            {
                return Err(EINVAL);
            }
        }
        let _guard = self.block_writes()?;
        for (sector, sectors) in ranges {
            self.mark(*sector, *sectors);
        }
        Ok(())
    }

    /// Ends the active sequence for a snapshot and returns its number and generation.
    /// Resets the table first if the sequence would pass 255. Call with the slot locked.
    pub(crate) fn start_snapshot(&self, dev: Arc<SnapDev>) -> (u64, [u8; 16]) {
        let mut generation = self.generation.lock();
        let mut seq = self.sequence.load(Ordering::Acquire);
        if seq >= MAX_SEQUENCE {
            for b in self.table.iter() {
                b.store(0, Ordering::Relaxed);
            }
            new_generation(&mut generation);
            seq = 1;
        }
        self.sequence.store(seq + 1, Ordering::Release);
        *self.snap.lock() = Some(dev);
        (seq, *generation)
    }

    /// Drops the snapshot reference. Call with the slot locked.
    pub(crate) fn end_snapshot(&self) {
        *self.snap.lock() = None;
    }

    /// The generation, the active sequence and (if asked) the table, read together: a
    /// reset (new generation) cannot fall between them. The table is copied to a kernel
    /// buffer first (no user page fault while the lock is held).
    pub(crate) fn state(&self, with_table: bool) -> Result<([u8; 16], u64, Option<KVVec<u8>>)> {
        let mut table = None;
        if with_table {
            table = Some(KVVec::with_capacity(self.table.len(), GFP_KERNEL)?);
        }
        let generation = self.generation.lock();
        let sequence = self.sequence.load(Ordering::Acquire);
        if let Some(buf) = table.as_mut() {
            for b in self.table.iter() {
                buf.push(b.load(Ordering::Relaxed), GFP_KERNEL)?;
            }
        }
        Ok((*generation, sequence, table))
    }
}

fn new_generation(generation: &mut [u8; 16]) {
    loop {
        random_bytes(generation);
        if *generation != [0; 16] {
            return;
        }
    }
}
