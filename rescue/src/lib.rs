//! Recovery media: `bkimg rescue build` writes a bootable image (USB stick, CD, PXE) whose
//! init is bkimg itself; booted on a bare machine it finds the repository (an export on
//! the media, or a filesystem by label), maps the restore point's disks to the machine's
//! disks by a rule that never picks the wrong one, restores, and reboots into the
//! restored system.
//!
//! Data flows one way: this crate sits on top of restore/ and format/.

pub mod config;
pub mod cpio;
pub mod disks;
pub mod efi;
pub mod image;
pub mod init;
pub mod modules;
pub mod net;
