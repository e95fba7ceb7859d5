// SPDX-License-Identifier: GPL-2.0
//! The control device's ioctl structures, as specified in spec/kmod-uapi.md. Every
//! structure has a fixed size (checked below); the size is part of the ioctl number, so a
//! caller built against another layout gets ENOTTY.

use kernel::ioctl::{_IOR, _IOW, _IOWR};

pub(crate) const TYPE: u32 = 0xBC;
pub(crate) const VERSION_MAJOR: u32 = 1;
pub(crate) const VERSION_MINOR: u32 = 0;
pub(crate) const FEATURE_CBT: u64 = 1 << 0;
pub(crate) const FEATURE_SNAPSHOT: u64 = 1 << 1;

pub(crate) const IOC_VERSION: u32 = _IOR::<Version>(TYPE, 0);
pub(crate) const IOC_TRACKER_ATTACH: u32 = _IOWR::<TrackerArg>(TYPE, 1);
pub(crate) const IOC_TRACKER_DETACH: u32 = _IOWR::<TrackerArg>(TYPE, 2);
pub(crate) const IOC_TRACKER_LIST: u32 = _IOWR::<ListArg>(TYPE, 3);
pub(crate) const IOC_TRACKER_READ: u32 = _IOWR::<TrackerArg>(TYPE, 4);
pub(crate) const IOC_TRACKER_MARK: u32 = _IOW::<MarkArg>(TYPE, 5);
pub(crate) const IOC_SNAPSHOT_CREATE: u32 = _IOWR::<CreateArg>(TYPE, 6);
pub(crate) const IOC_SNAPSHOT_DESTROY: u32 = _IOW::<SnapshotIdArg>(TYPE, 7);
pub(crate) const IOC_SNAPSHOT_INFO: u32 = _IOWR::<InfoArg>(TYPE, 8);
pub(crate) const IOC_SNAPSHOT_LIST: u32 = _IOWR::<ListArg>(TYPE, 9);
pub(crate) const IOC_STORE_ADD: u32 = _IOW::<StoreAddArg>(TYPE, 10);
pub(crate) const IOC_WAIT_EVENT: u32 = _IOWR::<EventArg>(TYPE, 11);

/// TrackerArg.flags
pub(crate) const TRACKER_RESTORE: u32 = 1 << 0;
pub(crate) const TRACKER_SAVE: u32 = 1 << 1;
/// CreateArg.flags
pub(crate) const CREATE_NO_FREEZE: u32 = 1 << 0;
/// InfoArg.state
pub(crate) const STATE_ACTIVE: u32 = 1;
pub(crate) const STATE_FAILED: u32 = 2;
/// EventArg.kind
pub(crate) const EVENT_NONE: u32 = 0;
pub(crate) const EVENT_LOW_SPACE: u32 = 1;
pub(crate) const EVENT_FAILED: u32 = 2;

pub(crate) const MAX_LIST: u32 = 1024;
pub(crate) const MAX_MARK_RANGES: u32 = 65536;
pub(crate) const MAX_SNAPSHOT_DEVS: u32 = 16;
pub(crate) const MAX_STORE_EXTENTS: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Version {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) features: u64,
    pub(crate) reserved: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct TrackerArg {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) flags: u32,
    pub(crate) block_size: u32,
    pub(crate) device_sectors: u64,
    pub(crate) blocks: u64,
    pub(crate) generation: [u8; 16],
    pub(crate) sequence: u64,
    pub(crate) table_ptr: u64,
    pub(crate) table_len: u64,
    pub(crate) snapshot_id: u64,
    pub(crate) writes: u64,
    pub(crate) reserved: [u64; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct ListArg {
    pub(crate) ptr: u64,
    pub(crate) capacity: u32,
    pub(crate) count: u32,
    pub(crate) reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct MarkArg {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) ranges_ptr: u64,
    pub(crate) count: u32,
    pub(crate) reserved0: u32,
    pub(crate) reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Range {
    pub(crate) sector: u64,
    pub(crate) sectors: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DevNum {
    pub(crate) major: u32,
    pub(crate) minor: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Extent {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) sector: u64,
    pub(crate) sectors: u64,
    pub(crate) reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct CreateArg {
    pub(crate) devs_ptr: u64,
    pub(crate) dev_count: u32,
    pub(crate) flags: u32,
    pub(crate) store_ptr: u64,
    pub(crate) store_count: u32,
    pub(crate) chunk_sectors: u32,
    pub(crate) low_water_sectors: u64,
    pub(crate) id: u64,
    pub(crate) reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct SnapshotIdArg {
    pub(crate) id: u64,
    pub(crate) reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct InfoArg {
    pub(crate) id: u64,
    pub(crate) state: u32,
    pub(crate) error: i32,
    pub(crate) store_sectors: u64,
    pub(crate) store_used_sectors: u64,
    pub(crate) low_water_sectors: u64,
    pub(crate) chunk_sectors: u32,
    pub(crate) dev_count: u32,
    pub(crate) devs_ptr: u64,
    pub(crate) devs_capacity: u32,
    pub(crate) reserved0: u32,
    pub(crate) copied_chunks: u64,
    pub(crate) created_ns: u64,
    pub(crate) reserved: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct SnapshotDev {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) image_major: u32,
    pub(crate) image_minor: u32,
    pub(crate) sectors: u64,
    pub(crate) generation: [u8; 16],
    pub(crate) sequence: u64,
    pub(crate) reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct StoreAddArg {
    pub(crate) id: u64,
    pub(crate) store_ptr: u64,
    pub(crate) store_count: u32,
    pub(crate) reserved0: u32,
    pub(crate) reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct EventArg {
    pub(crate) timeout_ms: u32,
    pub(crate) kind: u32,
    pub(crate) snapshot_id: u64,
    pub(crate) error: i32,
    pub(crate) reserved0: u32,
    pub(crate) store_sectors: u64,
    pub(crate) store_used_sectors: u64,
    pub(crate) reserved: [u64; 3],
}

const _: () = {
    assert!(core::mem::size_of::<Version>() == 64);
    assert!(core::mem::size_of::<TrackerArg>() == 128);
    assert!(core::mem::size_of::<ListArg>() == 32);
    assert!(core::mem::size_of::<MarkArg>() == 32);
    assert!(core::mem::size_of::<Range>() == 16);
    assert!(core::mem::size_of::<DevNum>() == 8);
    assert!(core::mem::size_of::<Extent>() == 32);
    assert!(core::mem::size_of::<CreateArg>() == 64);
    assert!(core::mem::size_of::<SnapshotIdArg>() == 16);
    assert!(core::mem::size_of::<InfoArg>() == 128);
    assert!(core::mem::size_of::<SnapshotDev>() == 64);
    assert!(core::mem::size_of::<StoreAddArg>() == 32);
    assert!(core::mem::size_of::<EventArg>() == 64);
};

/// Whether every reserved field is zero (callers must zero them: room to grow).
pub(crate) fn zero(words: &[u64]) -> bool {
    words.iter().all(|w| *w == 0)
}
