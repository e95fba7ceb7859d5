//! The control device's ioctl structures, as specified in spec/kmod-uapi.md (the kernel's
//! copy is kmod/uapi.rs). Every structure has a fixed size, checked below: the size is
//! part of the ioctl number, so a mismatch gets ENOTTY rather than garbage.

pub const TYPE: u8 = 0xBC;
pub const VERSION_MAJOR: u32 = 1;
pub const FEATURE_CBT: u64 = 1 << 0;
pub const FEATURE_SNAPSHOT: u64 = 1 << 1;

/// Command numbers (the `nr` of `_IOC`).
pub const NR_VERSION: u8 = 0;
pub const NR_TRACKER_ATTACH: u8 = 1;
pub const NR_TRACKER_DETACH: u8 = 2;
pub const NR_TRACKER_LIST: u8 = 3;
pub const NR_TRACKER_READ: u8 = 4;
pub const NR_TRACKER_MARK: u8 = 5;
pub const NR_SNAPSHOT_CREATE: u8 = 6;
pub const NR_SNAPSHOT_DESTROY: u8 = 7;
pub const NR_SNAPSHOT_INFO: u8 = 8;
pub const NR_SNAPSHOT_LIST: u8 = 9;
pub const NR_STORE_ADD: u8 = 10;
pub const NR_WAIT_EVENT: u8 = 11;

/// TrackerArg.flags
pub const TRACKER_RESTORE: u32 = 1 << 0;
pub const TRACKER_SAVE: u32 = 1 << 1;
/// CreateArg.flags
pub const CREATE_NO_FREEZE: u32 = 1 << 0;
/// InfoArg.state
pub const STATE_ACTIVE: u32 = 1;
pub const STATE_FAILED: u32 = 2;
/// EventArg.kind
pub const EVENT_NONE: u32 = 0;
pub const EVENT_LOW_SPACE: u32 = 1;
pub const EVENT_FAILED: u32 = 2;

pub const MAX_LIST: u32 = 1024;
pub const MAX_MARK_RANGES: usize = 65536;
pub const MAX_SNAPSHOT_DEVS: usize = 16;
pub const MAX_STORE_EXTENTS: usize = 4096;
/// The largest tracker table (one byte per block) the module keeps.
pub const MAX_BLOCKS: u64 = 1 << 26;
/// Sequences run from 1 to this; the table is reset rather than wrapped.
pub const MAX_SEQUENCE: u64 = 255;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub features: u64,
    pub reserved: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct TrackerArg {
    pub major: u32,
    pub minor: u32,
    pub flags: u32,
    pub block_size: u32,
    pub device_sectors: u64,
    pub blocks: u64,
    pub generation: [u8; 16],
    pub sequence: u64,
    pub table_ptr: u64,
    pub table_len: u64,
    pub snapshot_id: u64,
    pub writes: u64,
    pub reserved: [u64; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ListArg {
    pub ptr: u64,
    pub capacity: u32,
    pub count: u32,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct MarkArg {
    pub major: u32,
    pub minor: u32,
    pub ranges_ptr: u64,
    pub count: u32,
    pub reserved0: u32,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Range {
    pub sector: u64,
    pub sectors: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Extent {
    pub major: u32,
    pub minor: u32,
    pub sector: u64,
    pub sectors: u64,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CreateArg {
    pub devs_ptr: u64,
    pub dev_count: u32,
    pub flags: u32,
    pub store_ptr: u64,
    pub store_count: u32,
    pub chunk_sectors: u32,
    pub low_water_sectors: u64,
    pub id: u64,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SnapshotIdArg {
    pub id: u64,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct InfoArg {
    pub id: u64,
    pub state: u32,
    pub error: i32,
    pub store_sectors: u64,
    pub store_used_sectors: u64,
    pub low_water_sectors: u64,
    pub chunk_sectors: u32,
    pub dev_count: u32,
    pub devs_ptr: u64,
    pub devs_capacity: u32,
    pub reserved0: u32,
    pub copied_chunks: u64,
    pub created_ns: u64,
    pub reserved: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SnapshotDev {
    pub major: u32,
    pub minor: u32,
    pub image_major: u32,
    pub image_minor: u32,
    pub sectors: u64,
    pub generation: [u8; 16],
    pub sequence: u64,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct StoreAddArg {
    pub id: u64,
    pub store_ptr: u64,
    pub store_count: u32,
    pub reserved0: u32,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct EventArg {
    pub timeout_ms: u32,
    pub kind: u32,
    pub snapshot_id: u64,
    pub error: i32,
    pub reserved0: u32,
    pub store_sectors: u64,
    pub store_used_sectors: u64,
    pub reserved: [u64; 3],
}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<Version>() == 64);
    assert!(size_of::<TrackerArg>() == 128);
    assert!(size_of::<ListArg>() == 32);
    assert!(size_of::<MarkArg>() == 32);
    assert!(size_of::<Range>() == 16);
    assert!(size_of::<DevNum>() == 8);
    assert!(size_of::<Extent>() == 32);
    assert!(size_of::<CreateArg>() == 64);
    assert!(size_of::<SnapshotIdArg>() == 16);
    assert!(size_of::<InfoArg>() == 128);
    assert!(size_of::<SnapshotDev>() == 64);
    assert!(size_of::<StoreAddArg>() == 32);
    assert!(size_of::<EventArg>() == 64);
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// Field offsets as the tables of spec/kmod-uapi.md give them.
    #[test]
    fn offsets_match_the_spec() {
        assert_eq!(offset_of!(Version, features), 8);
        assert_eq!(offset_of!(Version, reserved), 16);

        assert_eq!(offset_of!(TrackerArg, flags), 8);
        assert_eq!(offset_of!(TrackerArg, block_size), 12);
        assert_eq!(offset_of!(TrackerArg, device_sectors), 16);
        assert_eq!(offset_of!(TrackerArg, blocks), 24);
        assert_eq!(offset_of!(TrackerArg, generation), 32);
        assert_eq!(offset_of!(TrackerArg, sequence), 48);
        assert_eq!(offset_of!(TrackerArg, table_ptr), 56);
        assert_eq!(offset_of!(TrackerArg, table_len), 64);
        assert_eq!(offset_of!(TrackerArg, snapshot_id), 72);
        assert_eq!(offset_of!(TrackerArg, writes), 80);
        assert_eq!(offset_of!(TrackerArg, reserved), 88);

        assert_eq!(offset_of!(ListArg, capacity), 8);
        assert_eq!(offset_of!(ListArg, count), 12);
        assert_eq!(offset_of!(MarkArg, ranges_ptr), 8);
        assert_eq!(offset_of!(MarkArg, count), 16);
        assert_eq!(offset_of!(Extent, sector), 8);
        assert_eq!(offset_of!(Extent, sectors), 16);

        assert_eq!(offset_of!(CreateArg, dev_count), 8);
        assert_eq!(offset_of!(CreateArg, flags), 12);
        assert_eq!(offset_of!(CreateArg, store_ptr), 16);
        assert_eq!(offset_of!(CreateArg, store_count), 24);
        assert_eq!(offset_of!(CreateArg, chunk_sectors), 28);
        assert_eq!(offset_of!(CreateArg, low_water_sectors), 32);
        assert_eq!(offset_of!(CreateArg, id), 40);
        assert_eq!(offset_of!(CreateArg, reserved), 48);

        assert_eq!(offset_of!(InfoArg, state), 8);
        assert_eq!(offset_of!(InfoArg, error), 12);
        assert_eq!(offset_of!(InfoArg, store_sectors), 16);
        assert_eq!(offset_of!(InfoArg, store_used_sectors), 24);
        assert_eq!(offset_of!(InfoArg, low_water_sectors), 32);
        assert_eq!(offset_of!(InfoArg, chunk_sectors), 40);
        assert_eq!(offset_of!(InfoArg, dev_count), 44);
        assert_eq!(offset_of!(InfoArg, devs_ptr), 48);
        assert_eq!(offset_of!(InfoArg, devs_capacity), 56);
        assert_eq!(offset_of!(InfoArg, copied_chunks), 64);
        assert_eq!(offset_of!(InfoArg, created_ns), 72);
        assert_eq!(offset_of!(InfoArg, reserved), 80);

        assert_eq!(offset_of!(SnapshotDev, image_major), 8);
        assert_eq!(offset_of!(SnapshotDev, sectors), 16);
        assert_eq!(offset_of!(SnapshotDev, generation), 24);
        assert_eq!(offset_of!(SnapshotDev, sequence), 40);
        assert_eq!(offset_of!(SnapshotDev, reserved), 48);

        assert_eq!(offset_of!(StoreAddArg, store_ptr), 8);
        assert_eq!(offset_of!(StoreAddArg, store_count), 16);

        assert_eq!(offset_of!(EventArg, kind), 4);
        assert_eq!(offset_of!(EventArg, snapshot_id), 8);
        assert_eq!(offset_of!(EventArg, error), 16);
        assert_eq!(offset_of!(EventArg, store_sectors), 24);
        assert_eq!(offset_of!(EventArg, store_used_sectors), 32);
        assert_eq!(offset_of!(EventArg, reserved), 40);
    }
}
