//! The crate's one place for `unsafe`: the ioctls on /dev/bksnap, `FS_IOC_FIEMAP` and the
//! inode flags (`FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`).
//!
//! Every wrapper takes the buffers the kernel reads or writes as slices and fills the
//! structure's pointer and length fields from them itself, so the kernel is never given
//! an address that outlives its buffer or a length larger than it.

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;

use crate::uapi;

mod raw {
    use crate::uapi::*;

    nix::ioctl_read!(version, TYPE, NR_VERSION, Version);
    nix::ioctl_readwrite!(tracker_attach, TYPE, NR_TRACKER_ATTACH, TrackerArg);
    nix::ioctl_readwrite!(tracker_detach, TYPE, NR_TRACKER_DETACH, TrackerArg);
    nix::ioctl_readwrite!(tracker_list, TYPE, NR_TRACKER_LIST, ListArg);
    nix::ioctl_readwrite!(tracker_read, TYPE, NR_TRACKER_READ, TrackerArg);
    nix::ioctl_write_ptr!(tracker_mark, TYPE, NR_TRACKER_MARK, MarkArg);
    nix::ioctl_readwrite!(snapshot_create, TYPE, NR_SNAPSHOT_CREATE, CreateArg);
    nix::ioctl_write_ptr!(snapshot_destroy, TYPE, NR_SNAPSHOT_DESTROY, SnapshotIdArg);
    nix::ioctl_readwrite!(snapshot_info, TYPE, NR_SNAPSHOT_INFO, InfoArg);
    nix::ioctl_readwrite!(snapshot_list, TYPE, NR_SNAPSHOT_LIST, ListArg);
    nix::ioctl_write_ptr!(store_add, TYPE, NR_STORE_ADD, StoreAddArg);
    nix::ioctl_readwrite!(wait_event, TYPE, NR_WAIT_EVENT, EventArg);

    nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, super::FiemapHeader);
    // Declared with a `long` argument, but the kernel reads and writes an `int`.
    nix::ioctl_read_bad!(
        fs_ioc_getflags,
        nix::request_code_read!(b'f', 1, std::mem::size_of::<std::ffi::c_long>()),
        std::ffi::c_int
    );
    nix::ioctl_write_ptr_bad!(
        fs_ioc_setflags,
        nix::request_code_write!(b'f', 2, std::mem::size_of::<std::ffi::c_long>()),
        std::ffi::c_int
    );
}

/// The request codes as the nix macros above compute them, for the tests against the
/// spec's `_IOC` encoding.
#[cfg(test)]
pub(crate) fn request_codes() -> Vec<(&'static str, u64)> {
    use std::mem::size_of;
    use uapi::*;
    vec![
        (
            "VERSION",
            nix::request_code_read!(TYPE, NR_VERSION, size_of::<Version>()) as u64,
        ),
        (
            "TRACKER_ATTACH",
            nix::request_code_readwrite!(TYPE, NR_TRACKER_ATTACH, size_of::<TrackerArg>()) as u64,
        ),
        (
            "TRACKER_DETACH",
            nix::request_code_readwrite!(TYPE, NR_TRACKER_DETACH, size_of::<TrackerArg>()) as u64,
        ),
        (
            "TRACKER_LIST",
            nix::request_code_readwrite!(TYPE, NR_TRACKER_LIST, size_of::<ListArg>()) as u64,
        ),
        (
            "TRACKER_READ",
            nix::request_code_readwrite!(TYPE, NR_TRACKER_READ, size_of::<TrackerArg>()) as u64,
        ),
        (
            "TRACKER_MARK",
            nix::request_code_write!(TYPE, NR_TRACKER_MARK, size_of::<MarkArg>()) as u64,
        ),
        (
            "SNAPSHOT_CREATE",
            nix::request_code_readwrite!(TYPE, NR_SNAPSHOT_CREATE, size_of::<CreateArg>()) as u64,
        ),
        (
            "SNAPSHOT_DESTROY",
            nix::request_code_write!(TYPE, NR_SNAPSHOT_DESTROY, size_of::<SnapshotIdArg>()) as u64,
        ),
        (
            "SNAPSHOT_INFO",
            nix::request_code_readwrite!(TYPE, NR_SNAPSHOT_INFO, size_of::<InfoArg>()) as u64,
        ),
        (
            "SNAPSHOT_LIST",
            nix::request_code_readwrite!(TYPE, NR_SNAPSHOT_LIST, size_of::<ListArg>()) as u64,
        ),
        (
            "STORE_ADD",
            nix::request_code_write!(TYPE, NR_STORE_ADD, size_of::<StoreAddArg>()) as u64,
        ),
        (
            "WAIT_EVENT",
            nix::request_code_readwrite!(TYPE, NR_WAIT_EVENT, size_of::<EventArg>()) as u64,
        ),
        (
            "FS_IOC_FIEMAP",
            nix::request_code_readwrite!(b'f', 11, size_of::<FiemapHeader>()) as u64,
        ),
    ]
}

fn addr<T>(p: *const T) -> u64 {
    p as usize as u64
}

fn len32(n: usize) -> Result<u32, Errno> {
    u32::try_from(n).map_err(|_| Errno::EINVAL)
}

pub fn version(fd: impl AsFd) -> Result<uapi::Version, Errno> {
    let mut v = uapi::Version::default();
    // SAFETY: `v` is a live, writable `Version`, the structure this request code names.
    unsafe { raw::version(fd.as_fd().as_raw_fd(), &mut v) }?;
    Ok(v)
}

/// TRACKER_ATTACH; `table` is the saved table for RESTORE (read by the kernel).
pub fn tracker_attach(
    fd: impl AsFd,
    arg: &mut uapi::TrackerArg,
    table: Option<&[u8]>,
) -> Result<(), Errno> {
    (arg.table_ptr, arg.table_len) = table.map_or((0, 0), |t| (addr(t.as_ptr()), t.len() as u64));
    // SAFETY: `arg` is a live `TrackerArg`; its table pointer and length describe `table`,
    // borrowed for the whole call (or are 0).
    unsafe { raw::tracker_attach(fd.as_fd().as_raw_fd(), arg) }?;
    Ok(())
}

/// Points the argument's table fields at a buffer the kernel writes into (or at nothing).
fn set_out_table(arg: &mut uapi::TrackerArg, table: Option<&mut [u8]>) {
    (arg.table_ptr, arg.table_len) =
        table.map_or((0, 0), |t| (addr(t.as_mut_ptr()), t.len() as u64));
}

/// TRACKER_DETACH; with SAVE the kernel writes the table into `table`.
pub fn tracker_detach(
    fd: impl AsFd,
    arg: &mut uapi::TrackerArg,
    table: Option<&mut [u8]>,
) -> Result<(), Errno> {
    set_out_table(arg, table);
    // SAFETY: as in `tracker_attach`; the table is mutably borrowed, so the kernel's
    // write into it (at most `table_len` bytes) aliases nothing.
    unsafe { raw::tracker_detach(fd.as_fd().as_raw_fd(), arg) }?;
    Ok(())
}

/// TRACKER_READ; with `table` the kernel writes the table into it.
pub fn tracker_read(
    fd: impl AsFd,
    arg: &mut uapi::TrackerArg,
    table: Option<&mut [u8]>,
) -> Result<(), Errno> {
    set_out_table(arg, table);
    // SAFETY: as in `tracker_detach`.
    unsafe { raw::tracker_read(fd.as_fd().as_raw_fd(), arg) }?;
    Ok(())
}

/// TRACKER_LIST into `out`; returns the number of trackers (may exceed `out.len()`).
pub fn tracker_list(fd: impl AsFd, out: &mut [uapi::TrackerArg]) -> Result<u32, Errno> {
    let mut l = uapi::ListArg {
        ptr: addr(out.as_mut_ptr()),
        capacity: len32(out.len())?,
        ..Default::default()
    };
    // SAFETY: `l` is live; `ptr`/`capacity` describe `out`, mutably borrowed for the call
    // (the kernel writes at most `capacity` structures).
    unsafe { raw::tracker_list(fd.as_fd().as_raw_fd(), &mut l) }?;
    Ok(l.count)
}

/// TRACKER_MARK of `ranges` on one device.
pub fn tracker_mark(
    fd: impl AsFd,
    major: u32,
    minor: u32,
    ranges: &[uapi::Range],
) -> Result<(), Errno> {
    let m = uapi::MarkArg {
        major,
        minor,
        ranges_ptr: addr(ranges.as_ptr()),
        count: len32(ranges.len())?,
        ..Default::default()
    };
    // SAFETY: `m` is live; `ranges_ptr`/`count` describe `ranges`, borrowed for the call.
    unsafe { raw::tracker_mark(fd.as_fd().as_raw_fd(), &m) }?;
    Ok(())
}

/// SNAPSHOT_CREATE of `devs` with `store`; returns the id.
pub fn snapshot_create(
    fd: impl AsFd,
    devs: &[uapi::DevNum],
    store: &[uapi::Extent],
    flags: u32,
    chunk_sectors: u32,
    low_water_sectors: u64,
) -> Result<u64, Errno> {
    let mut c = uapi::CreateArg {
        devs_ptr: addr(devs.as_ptr()),
        dev_count: len32(devs.len())?,
        flags,
        store_ptr: addr(store.as_ptr()),
        store_count: len32(store.len())?,
        chunk_sectors,
        low_water_sectors,
        ..Default::default()
    };
    // SAFETY: `c` is live; both pointer/count pairs describe slices borrowed for the call.
    unsafe { raw::snapshot_create(fd.as_fd().as_raw_fd(), &mut c) }?;
    Ok(c.id)
}

pub fn snapshot_destroy(fd: impl AsFd, id: u64) -> Result<(), Errno> {
    let a = uapi::SnapshotIdArg { id, reserved: 0 };
    // SAFETY: `a` is a live `SnapshotIdArg`; it holds no pointers.
    unsafe { raw::snapshot_destroy(fd.as_fd().as_raw_fd(), &a) }?;
    Ok(())
}

/// SNAPSHOT_INFO; the kernel writes up to `devs.len()` devices into `devs`.
pub fn snapshot_info(
    fd: impl AsFd,
    id: u64,
    devs: &mut [uapi::SnapshotDev],
) -> Result<uapi::InfoArg, Errno> {
    let mut a = uapi::InfoArg {
        id,
        devs_ptr: addr(devs.as_mut_ptr()),
        devs_capacity: len32(devs.len())?,
        ..Default::default()
    };
    // SAFETY: `a` is live; `devs_ptr`/`devs_capacity` describe `devs`, mutably borrowed.
    unsafe { raw::snapshot_info(fd.as_fd().as_raw_fd(), &mut a) }?;
    Ok(a)
}

/// SNAPSHOT_LIST into `out`; returns the number of snapshots (may exceed `out.len()`).
pub fn snapshot_list(fd: impl AsFd, out: &mut [u64]) -> Result<u32, Errno> {
    let mut l = uapi::ListArg {
        ptr: addr(out.as_mut_ptr()),
        capacity: len32(out.len())?,
        ..Default::default()
    };
    // SAFETY: as in `tracker_list`, with `u64` ids.
    unsafe { raw::snapshot_list(fd.as_fd().as_raw_fd(), &mut l) }?;
    Ok(l.count)
}

pub fn store_add(fd: impl AsFd, id: u64, store: &[uapi::Extent]) -> Result<(), Errno> {
    let a = uapi::StoreAddArg {
        id,
        store_ptr: addr(store.as_ptr()),
        store_count: len32(store.len())?,
        ..Default::default()
    };
    // SAFETY: `a` is live; `store_ptr`/`store_count` describe `store`, borrowed.
    unsafe { raw::store_add(fd.as_fd().as_raw_fd(), &a) }?;
    Ok(())
}

pub fn wait_event(
    fd: impl AsFd,
    timeout_ms: u32,
    snapshot_id: u64,
) -> Result<uapi::EventArg, Errno> {
    let mut e = uapi::EventArg {
        timeout_ms,
        snapshot_id,
        ..Default::default()
    };
    // SAFETY: `e` is a live `EventArg`; it holds no pointers.
    unsafe { raw::wait_event(fd.as_fd().as_raw_fd(), &mut e) }?;
    Ok(e)
}

// FIEMAP (linux/fiemap.h).

pub const FIEMAP_FLAG_SYNC: u32 = 0x1;
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
pub const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct FiemapExtent {
    pub fe_logical: u64,
    pub fe_physical: u64,
    pub fe_length: u64,
    fe_reserved64: [u64; 2],
    pub fe_flags: u32,
    fe_reserved: [u32; 3],
}

const FIEMAP_BATCH: usize = 256;

/// The header followed by room for its extents, as `struct fiemap` with its flexible
/// array member.
#[repr(C)]
struct FiemapBuf {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

const _: () = {
    assert!(std::mem::size_of::<FiemapHeader>() == 32);
    assert!(std::mem::size_of::<FiemapExtent>() == 56);
    assert!(std::mem::offset_of!(FiemapBuf, extents) == 32);
};

/// One FIEMAP call: the extents (at most a batch) of the file's bytes
/// `[start, start + length)`.
pub fn fiemap(
    fd: impl AsFd,
    start: u64,
    length: u64,
    flags: u32,
) -> Result<Vec<FiemapExtent>, Errno> {
    let mut buf = Box::new(FiemapBuf {
        header: FiemapHeader {
            fm_start: start,
            fm_length: length,
            fm_flags: flags,
            fm_extent_count: FIEMAP_BATCH as u32,
            ..Default::default()
        },
        extents: [FiemapExtent::default(); FIEMAP_BATCH],
    });
    let header: *mut FiemapHeader = &mut buf.header;
    // SAFETY: `header` is the first field of a live, exclusively borrowed `FiemapBuf`
    // (`repr(C)`), followed by exactly `fm_extent_count` extent slots, which is all the
    // kernel writes after the header.
    unsafe { raw::fs_ioc_fiemap(fd.as_fd().as_raw_fd(), header) }?;
    let n = (buf.header.fm_mapped_extents as usize).min(FIEMAP_BATCH);
    Ok(buf.extents[..n].to_vec())
}

/// `FS_IMMUTABLE_FL`: no write, truncation, allocation, rename or unlink, even by root.
pub const FS_IMMUTABLE_FL: u32 = 0x10;

/// The inode flags of an open file (`chattr`'s view); ENOTTY where the filesystem has none.
pub fn inode_flags(fd: impl AsFd) -> Result<u32, Errno> {
    let mut flags: std::ffi::c_int = 0;
    // SAFETY: `flags` is a valid `int` the kernel writes.
    unsafe { raw::fs_ioc_getflags(fd.as_fd().as_raw_fd(), &mut flags) }?;
    Ok(flags as u32)
}

pub fn set_inode_flags(fd: impl AsFd, flags: u32) -> Result<(), Errno> {
    let flags = flags as std::ffi::c_int;
    // SAFETY: `flags` is a valid `int` the kernel reads.
    unsafe { raw::fs_ioc_setflags(fd.as_fd().as_raw_fd(), &flags) }?;
    Ok(())
}
