// SPDX-License-Identifier: GPL-2.0
//! The module's one place for `unsafe`: the calls into the C shim (shim.c), the entry
//! points it calls back, and the byte-level traits of the uapi structures.

use core::ffi::c_void;
use kernel::bindings;
use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::types::{AsBytes, FromBytes};

use crate::snapshot::{CowWrite, SnapDev};
use crate::tracker::Tracker;
use crate::{uapi, State};

extern "C" {
    fn bksnap_c_init(state: *const c_void) -> i32;
    fn bksnap_c_exit();
    fn bksnap_c_module_get();
    fn bksnap_c_module_put();
    fn bksnap_c_bdev_open(major: u32, minor: u32, write: bool, err: *mut i32) -> *mut c_void;
    fn bksnap_c_bdev_close(file: *mut c_void);
    fn bksnap_c_bdev_sectors(file: *mut c_void) -> u64;
    fn bksnap_c_bdev_span(file: *mut c_void, disk: *mut u64, start: *mut u64);
    fn bksnap_c_bdev_block_size(file: *mut c_void) -> u32;
    fn bksnap_c_bdev_freeze(file: *mut c_void) -> i32;
    fn bksnap_c_bdev_thaw(file: *mut c_void);
    fn bksnap_c_mark_written(file: *mut c_void, sector: u64, sectors: u64);
    fn bksnap_c_queue_freeze(file: *mut c_void);
    fn bksnap_c_queue_unfreeze(file: *mut c_void);
    fn bksnap_c_rw(
        file: *mut c_void,
        sector: u64,
        buf: *mut c_void,
        len: u32,
        write: bool,
        timeout_ms: u32,
    ) -> i32;
    fn bksnap_c_buf_alloc(len: u32) -> *mut c_void;
    fn bksnap_c_buf_free(buf: *mut c_void);
    fn bksnap_c_slot_add(file: *mut c_void, tracker: *const c_void) -> i32;
    fn bksnap_c_slot_remove(slot: i32);
    fn bksnap_c_slot_lock(slot: i32);
    fn bksnap_c_slot_unlock(slot: i32);
    fn bksnap_c_image_alloc() -> *mut c_void;
    fn bksnap_c_image_add_disk(
        image: *mut c_void,
        rs: *const c_void,
        origin: *mut c_void,
        id: u64,
        index: u32,
        major: *mut u32,
        minor: *mut u32,
    ) -> i32;
    fn bksnap_c_image_destroy(image: *mut c_void);
    fn bksnap_c_image_lock_read(image: *mut c_void);
    fn bksnap_c_image_unlock_read(image: *mut c_void);
    fn bksnap_c_image_lock_write(image: *mut c_void);
    fn bksnap_c_image_unlock_write(image: *mut c_void);
    fn bksnap_c_bio_read_span(
        bio: *mut c_void,
        offset: u64,
        sectors: u64,
        file: *mut c_void,
        sector: u64,
    ) -> i32;
    fn bksnap_c_random(buf: *mut u8, len: u32);
    fn bksnap_c_cow_queue(item: *mut c_void) -> i32;
    fn bksnap_c_cow_flush();
}

fn errno(ret: i32) -> Result {
    if ret < 0 {
        Err(Error::from_errno(ret))
    } else {
        Ok(())
    }
}

/// Registers the control device and the write hook; `state` must outlive [`exit`].
pub(crate) fn init(state: &Arc<State>) -> Result {
    let ptr: *const State = &**state;
    // SAFETY: the pointer stays valid until `exit`: the module keeps the `Arc` alive.
    errno(unsafe { bksnap_c_init(ptr.cast()) })
}

/// Unregisters what [`init`] registered and waits for every hook still running.
pub(crate) fn exit() {
    // SAFETY: called once, after a successful `init`.
    unsafe { bksnap_c_exit() }
}

/// A reference on this module while trackers or snapshots exist: `rmmod` is refused.
pub(crate) struct ModuleRef(());

impl ModuleRef {
    pub(crate) fn get() -> Self {
        // SAFETY: the module is live (we are running its code).
        unsafe { bksnap_c_module_get() };
        ModuleRef(())
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        // SAFETY: balances the reference taken in `get`.
        unsafe { bksnap_c_module_put() };
    }
}

pub(crate) fn random_bytes(buf: &mut [u8]) {
    // SAFETY: the buffer is valid for writes of its length.
    unsafe { bksnap_c_random(buf.as_mut_ptr(), buf.len() as u32) }
}

/// An open block device (a `struct file` from `bdev_file_open_by_dev`).
pub(crate) struct BdevFile(*mut c_void);

// SAFETY: the file reference may be used and dropped from any thread.
unsafe impl Send for BdevFile {}
// SAFETY: every operation on it is thread-safe in the block layer.
unsafe impl Sync for BdevFile {}

impl BdevFile {
    pub(crate) fn open(major: u32, minor: u32, write: bool) -> Result<Self> {
        let mut err = 0;
        // SAFETY: `err` is a valid out pointer.
        let file = unsafe { bksnap_c_bdev_open(major, minor, write, &mut err) };
        if file.is_null() {
            return Err(Error::from_errno(if err < 0 { err } else { -22 }));
        }
        Ok(BdevFile(file))
    }

    pub(crate) fn sectors(&self) -> u64 {
        // SAFETY: `self.0` is an open block device file.
        unsafe { bksnap_c_bdev_sectors(self.0) }
    }

    /// Where `sectors` sectors from `sector` of this device lie on its whole disk.
    pub(crate) fn span(&self, sector: u64, sectors: u64) -> Span {
        let (mut disk, mut start) = (0, 0);
        // SAFETY: `self.0` is an open block device file; out pointers valid.
        unsafe { bksnap_c_bdev_span(self.0, &mut disk, &mut start) };
        Span {
            disk,
            start: start.saturating_add(sector),
            sectors,
        }
    }

    pub(crate) fn block_size(&self) -> u32 {
        // SAFETY: as above.
        unsafe { bksnap_c_bdev_block_size(self.0) }
    }

    pub(crate) fn freeze(&self) -> Result {
        // SAFETY: as above.
        errno(unsafe { bksnap_c_bdev_freeze(self.0) })
    }

    pub(crate) fn thaw(&self) {
        // SAFETY: as above. Thawing what was not frozen fails harmlessly.
        unsafe { bksnap_c_bdev_thaw(self.0) };
    }

    /// Tells the trackers of this device that the module itself wrote the range.
    pub(crate) fn mark_written(&self, sector: u64, sectors: u64) {
        // SAFETY: as above.
        unsafe { bksnap_c_mark_written(self.0, sector, sectors) };
    }

    pub(crate) fn freeze_queue(&self) {
        // SAFETY: as above; balanced by `unfreeze_queue`.
        unsafe { bksnap_c_queue_freeze(self.0) }
    }

    pub(crate) fn unfreeze_queue(&self) {
        // SAFETY: as above.
        unsafe { bksnap_c_queue_unfreeze(self.0) }
    }

    /// Reads or writes `buf` at `sector`, waiting at most `timeout_ms`. On a timeout the
    /// buffer is leaked (the device may still write into it).
    pub(crate) fn rw(
        &self,
        sector: u64,
        buf: &mut IoBuffer,
        len: u32,
        write: bool,
        timeout_ms: u32,
    ) -> Result {
        if len > buf.len {
            return Err(EINVAL);
        }
        // SAFETY: `buf.ptr` is a vmalloc buffer of at least `len` bytes owned by `buf`.
        let ret = unsafe { bksnap_c_rw(self.0, sector, buf.ptr, len, write, timeout_ms) };
        if ret == -(bindings::ETIMEDOUT as i32) {
            buf.leak = true;
        }
        errno(ret)
    }

    fn raw(&self) -> *mut c_void {
        self.0
    }
}

impl Drop for BdevFile {
    fn drop(&mut self) {
        // SAFETY: `self.0` was opened by `open` and is closed once.
        unsafe { bksnap_c_bdev_close(self.0) }
    }
}

/// A range of sectors on a whole disk: a partition and its disk, or two partitions of one
/// disk, are compared by these.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    /// Identifies the disk while a file of it is open (not a number userspace sees).
    disk: u64,
    start: u64,
    sectors: u64,
}

impl Span {
    pub(crate) fn overlaps(&self, other: &Span) -> bool {
        self.disk == other.disk
            && self.start < other.start.saturating_add(other.sectors)
            && other.start < self.start.saturating_add(self.sectors)
    }
}

/// Runs `item` on the module's copy-on-write workqueue; gives it back if it cannot be
/// queued (no memory), for the caller to run itself.
pub(crate) fn cow_queue(item: KBox<CowWrite>) -> core::result::Result<(), KBox<CowWrite>> {
    let raw = KBox::into_raw(item);
    // SAFETY: the shim hands `raw` back exactly once, to `bksnap_rs_cow_work`, or not at
    // all when it returns an error.
    if unsafe { bksnap_c_cow_queue(raw.cast()) } == 0 {
        return Ok(());
    }
    // SAFETY: not queued: `raw` is still ours, from `KBox::into_raw` above.
    Err(unsafe { KBox::from_raw(raw) })
}

/// Waits until every queued copy-on-write item has run.
pub(crate) fn cow_flush() {
    // SAFETY: no arguments; the workqueue lives as long as the module.
    unsafe { bksnap_c_cow_flush() }
}

#[no_mangle]
extern "C" fn bksnap_rs_cow_work(item: *mut c_void) {
    // SAFETY: `item` came from `KBox::into_raw` in `cow_queue` and is handed back once.
    let item = unsafe { KBox::from_raw(item.cast::<CowWrite>()) };
    KBox::into_inner(item).run();
}

/// A vmalloc buffer for copy-on-write I/O.
pub(crate) struct IoBuffer {
    ptr: *mut c_void,
    len: u32,
    leak: bool,
}

impl IoBuffer {
    pub(crate) fn new(len: u32) -> Result<Self> {
        // SAFETY: plain allocation.
        let ptr = unsafe { bksnap_c_buf_alloc(len) };
        if ptr.is_null() {
            return Err(ENOMEM);
        }
        Ok(IoBuffer {
            ptr,
            len,
            leak: false,
        })
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: allocated by `bksnap_c_buf_alloc`, no I/O in flight on it.
            unsafe { bksnap_c_buf_free(self.ptr) }
        }
    }
}

/// A tracked device's registration with the write hook. It holds its tracker: the hook
/// calls into a tracker only while its slot exists. (The tracker holds the slot in turn;
/// detaching breaks that cycle.)
pub(crate) struct Slot {
    index: i32,
    _tracker: Arc<Tracker>,
}

impl Slot {
    /// From now on every write to `file`'s range goes through `tracker.write()`.
    pub(crate) fn add(file: &BdevFile, tracker: Arc<Tracker>) -> Result<Self> {
        let ptr: *const Tracker = &*tracker;
        // SAFETY: `file` is open; the tracker stays alive while the slot lives (the slot
        // owns a reference), and the slot is removed (waiting for the hook) before that
        // reference is dropped (`Drop` runs before the fields are dropped).
        let ret = unsafe { bksnap_c_slot_add(file.raw(), ptr.cast()) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(Slot {
            index: ret,
            _tracker: tracker,
        })
    }

    pub(crate) fn index(&self) -> i32 {
        self.index
    }

    /// Blocks writes to the device until the guard is dropped (after those already past
    /// the hook have finished their copy-on-write and been submitted). The guard holds a
    /// reference to the slot: the slot (and its lock) cannot be removed while it is held.
    pub(crate) fn lock(this: &Arc<Slot>) -> SlotGuard {
        // SAFETY: the slot is registered until the last reference to it is dropped; the
        // guard keeps one.
        unsafe { bksnap_c_slot_lock(this.index) };
        SlotGuard(this.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: registered by `add`, removed once; no guard is held (each holds a
        // reference). Waits until no hook uses the tracker any more.
        unsafe { bksnap_c_slot_remove(self.index) }
    }
}

/// Writes to a tracked device held back (see [`Slot::lock`]).
pub(crate) struct SlotGuard(Arc<Slot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // SAFETY: locked by `Slot::lock` on this slot, which our reference keeps
        // registered; the unlock comes before that reference is dropped.
        unsafe { bksnap_c_slot_unlock(self.0.index) }
    }
}

/// A snapshot image: its copy-on-write lock, then its read-only disk.
pub(crate) struct Image(*mut c_void);

// SAFETY: the C image object is used under its own locks from any thread.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: plain allocation.
        let ptr = unsafe { bksnap_c_image_alloc() };
        if ptr.is_null() {
            return Err(ENOMEM);
        }
        Ok(Image(ptr))
    }

    /// Adds `dev`'s read-only image disk, whose reads go to `dev.image_read()`. Taking
    /// the image from `dev` (never another) is what makes this safe: the image is the
    /// first field of `dev`, so it is dropped, removing the disk and waiting for its reads,
    /// before the rest of `dev`; and `dev` sits in an `Arc`, so it does not move. A second
    /// call fails with `EBUSY`.
    pub(crate) fn add_disk(
        dev: &Arc<SnapDev>,
        origin: &BdevFile,
        id: u64,
        index: u32,
    ) -> Result<(u32, u32)> {
        let (mut major, mut minor) = (0, 0);
        let rs: *const SnapDev = &**dev;
        // SAFETY: `dev.image()` lives exactly as long as `*rs` (above); the shim refuses
        // an image that already has a disk; out pointers valid.
        errno(unsafe {
            bksnap_c_image_add_disk(
                dev.image().0,
                rs.cast(),
                origin.raw(),
                id,
                index,
                &mut major,
                &mut minor,
            )
        })?;
        Ok((major, minor))
    }

    pub(crate) fn read_lock(&self) -> ImageGuard<'_> {
        // SAFETY: `self.0` is live.
        unsafe { bksnap_c_image_lock_read(self.0) };
        ImageGuard(self, false)
    }

    pub(crate) fn write_lock(&self) -> ImageGuard<'_> {
        // SAFETY: `self.0` is live.
        unsafe { bksnap_c_image_lock_write(self.0) };
        ImageGuard(self, true)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: removes the disk (if any) and waits for its reads to finish.
        unsafe { bksnap_c_image_destroy(self.0) }
    }
}

pub(crate) struct ImageGuard<'a>(&'a Image, bool);

impl Drop for ImageGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: taken by `read_lock` / `write_lock`.
        unsafe {
            if self.1 {
                bksnap_c_image_unlock_write((self.0).0)
            } else {
                bksnap_c_image_unlock_read((self.0).0)
            }
        }
    }
}

/// A read bio of a snapshot image, for the duration of `bksnap_rs_image_read`.
pub(crate) struct Bio(*mut c_void);

impl Bio {
    /// Fills `sectors` sectors of the bio, from `offset` sectors into it, from `file`.
    pub(crate) fn read_span(
        &self,
        offset: u64,
        sectors: u64,
        file: &BdevFile,
        sector: u64,
    ) -> Result {
        // SAFETY: the bio is live while its image read runs; `file` is open.
        errno(unsafe { bksnap_c_bio_read_span(self.0, offset, sectors, file.raw(), sector) })
    }
}

#[no_mangle]
extern "C" fn bksnap_rs_write(
    tracker: *const c_void,
    sector: u64,
    sectors: u64,
    may_block: bool,
) -> i32 {
    // SAFETY: the shim only calls this for a registered slot, inside an SRCU section that
    // slot removal waits for; the slot owns a reference to its tracker.
    let tracker = unsafe { &*tracker.cast::<Tracker>() };
    tracker.write(sector, sectors, may_block)
}

#[no_mangle]
extern "C" fn bksnap_rs_mark(tracker: *const c_void, sector: u64, sectors: u64) {
    // SAFETY: as for `bksnap_rs_write`.
    let tracker = unsafe { &*tracker.cast::<Tracker>() };
    tracker.mark_written(sector, sectors);
}

#[no_mangle]
extern "C" fn bksnap_rs_ioctl(state: *const c_void, cmd: u32, arg: usize) -> isize {
    // SAFETY: `state` is the pointer given to `bksnap_c_init`, alive until `exit`.
    let state = unsafe { &*state.cast::<State>() };
    match state.ioctl(cmd, arg) {
        Ok(()) => 0,
        Err(e) => e.to_errno() as isize,
    }
}

#[no_mangle]
extern "C" fn bksnap_rs_image_read(
    image: *const c_void,
    bio: *mut c_void,
    sector: u64,
    sectors: u64,
) -> i32 {
    // SAFETY: images are destroyed (waiting for their reads) before their `SnapDev`.
    let dev = unsafe { &*image.cast::<SnapDev>() };
    match dev.image_read(&Bio(bio), sector, sectors) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

macro_rules! plain_old_data {
    ($($t:ty),*) => {$(
        // SAFETY: `repr(C)` structures of integers and byte arrays without padding (their
        // sizes are checked in uapi.rs): every bit pattern is valid, every byte is
        // initialised.
        unsafe impl FromBytes for $t {}
        // SAFETY: as above.
        unsafe impl AsBytes for $t {}
    )*};
}

plain_old_data!(
    uapi::Version,
    uapi::TrackerArg,
    uapi::ListArg,
    uapi::MarkArg,
    uapi::Range,
    uapi::DevNum,
    uapi::Extent,
    uapi::CreateArg,
    uapi::SnapshotIdArg,
    uapi::InfoArg,
    uapi::SnapshotDev,
    uapi::StoreAddArg,
    uapi::EventArg
);
