//! The one place this crate talks to the kernel beyond std: re-reading a partition table.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Asks the kernel to re-read the partition table of a whole-disk block device, so that
/// the restored partitions appear as device nodes. Fails harmlessly on partitions and on
/// devices without partition scanning.
pub fn reread_partition_table(file: &std::fs::File) -> nix::Result<()> {
    // SAFETY: BLKRRPART takes no argument and only reads the device the descriptor names;
    // the descriptor is open for the whole call because `file` is borrowed.
    unsafe { blkrrpart(file.as_raw_fd()) }.map(drop)
}
