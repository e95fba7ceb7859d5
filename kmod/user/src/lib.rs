//! The userspace side of the bksnap kernel module (spec/kmod-uapi.md is normative): the
//! only code in bkimg that talks to /dev/bksnap.
//!
//! - [`Control`]: change trackers (attach, detach, read, mark) and snapshots (create,
//!   destroy, info, store growth, events), devices named by path or number;
//! - [`StoreFile`]: a difference store backed by a preallocated file;
//! - [`SavedTracker`]: a tracker's state saved across a reboot (spec §8), bound to its
//!   device by a [`Binding`] (identity and content fingerprint);
//! - [`change_map`]: a tracker's table turned into a `bkimg_format` change map.
//!
//! `unsafe` is confined to `sys` (the ioctls).
#![deny(unsafe_code)]

pub mod binding;
mod changemap;
mod control;
mod device;
mod error;
pub mod saved;
mod store;
#[allow(unsafe_code)]
mod sys;
pub mod uapi;

pub use binding::Binding;
pub use changemap::{change_map, dirty_runs};
pub use control::{
    describe_errno, image_path, Control, Event, EventKind, Extent, ModuleVersion, SectorRange,
    SnapshotDev, SnapshotInfo, SnapshotOptions, SnapshotState, TrackerState, CONTROL_PATH,
};
pub use device::{AsDevice, DevNum};
pub use error::{ErrorKind, KmodError, Result};
pub use saved::{remove_durably, write_atomic, SavedTracker};
pub use store::{remove_store_path, StoreFile, STORE_ALIGN};

/// Why a saved state may not be restored on `dev` (None: it may): another size, no
/// binding (a version 1 file), another identity, or content changed since the save.
pub fn saved_mismatch(saved: &SavedTracker, dev: DevNum) -> Result<Option<String>> {
    let sectors = dev.sectors()?;
    if sectors != saved.device_sectors {
        return Ok(Some(format!(
            "it was saved from a device of {} bytes, but this one has {} bytes (another device)",
            saved.device_sectors * 512,
            sectors * 512
        )));
    }
    match &saved.binding {
        None => Ok(Some(
            "it was saved without the device's identity and fingerprint (an older bkimg), \
             so it cannot be trusted"
                .into(),
        )),
        Some(b) => b.mismatch_on_device(dev),
    }
}

impl Control {
    /// Restores tracking of `dev` from a saved state file, which is consumed: it is
    /// checked against the device (size, identity, content fingerprint: a mismatch is a
    /// [`KmodError::SavedMismatch`] and the file is left in place), removed (durably),
    /// and only then the tracker is attached. A state must be used once: after this
    /// boot's writes, the file no longer describes the device, and reusing it after a
    /// crash would miss changes. If the attach fails, the state is lost, which costs one
    /// full read, never a missed change.
    pub fn restore_from_file(
        &self,
        dev: impl AsDevice,
        path: &std::path::Path,
    ) -> Result<TrackerState> {
        let dev = dev.devnum()?;
        let saved = SavedTracker::read_from(path)?;
        if let Some(detail) = saved_mismatch(&saved, dev)? {
            return Err(KmodError::SavedMismatch {
                path: path.to_path_buf(),
                device: dev.describe(),
                detail,
            });
        }
        remove_durably(path).map_err(|e| {
            KmodError::io(
                format!(
                    "cannot remove {} before restoring it (a saved state must be used only \
                     once: keep it on a writable filesystem)",
                    path.display()
                ),
                e,
            )
        })?;
        self.attach_restore(dev, &saved)
    }
}

#[cfg(test)]
mod tests {
    use super::uapi;

    /// `_IOC(dir, type, nr, size)` as the Linux headers define it on x86-64 and arm64.
    fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (u64::from(ty) << 8) | u64::from(nr)
    }
    const W: u64 = 1;
    const R: u64 = 2;

    /// The request codes nix generates are the spec's: `_IOR(0xBC, 0, 64 bytes)`, ...
    #[test]
    fn request_codes_match_the_spec() {
        let expected = [
            ("VERSION", ioc(R, 0xBC, 0, 64)),
            ("TRACKER_ATTACH", ioc(R | W, 0xBC, 1, 128)),
            ("TRACKER_DETACH", ioc(R | W, 0xBC, 2, 128)),
            ("TRACKER_LIST", ioc(R | W, 0xBC, 3, 32)),
            ("TRACKER_READ", ioc(R | W, 0xBC, 4, 128)),
            ("TRACKER_MARK", ioc(W, 0xBC, 5, 32)),
            ("SNAPSHOT_CREATE", ioc(R | W, 0xBC, 6, 64)),
            ("SNAPSHOT_DESTROY", ioc(W, 0xBC, 7, 16)),
            ("SNAPSHOT_INFO", ioc(R | W, 0xBC, 8, 128)),
            ("SNAPSHOT_LIST", ioc(R | W, 0xBC, 9, 32)),
            ("STORE_ADD", ioc(W, 0xBC, 10, 32)),
            ("WAIT_EVENT", ioc(R | W, 0xBC, 11, 64)),
            ("FS_IOC_FIEMAP", ioc(R | W, b'f', 11, 32)),
        ];
        let got = super::sys::request_codes();
        assert_eq!(got.len(), expected.len());
        for ((name, code), (ename, ecode)) in got.iter().zip(expected) {
            assert_eq!(*name, ename);
            assert_eq!(*code, ecode, "{name}: {code:#x} != {ecode:#x}");
        }
        // Two spot checks written out by hand.
        assert_eq!(ioc(R | W, 0xBC, 6, 64), 0xc040_bc06);
        assert_eq!(ioc(R, 0xBC, 0, 64), 0x8040_bc00);
        // FS_IOC_FIEMAP is 0xc020660b in linux/fs.h.
        assert_eq!(ioc(R | W, b'f', 11, 32), 0xc020_660b);
        assert_eq!(uapi::TYPE, 0xBC);
    }

    #[test]
    fn missing_control_device_says_how_to_load_the_module() {
        let e = super::Control::open_at(std::path::Path::new("/nonexistent/bksnap"))
            .err()
            .expect("no device");
        assert_eq!(e.kind(), super::ErrorKind::NotLoaded);
        let msg = e.to_string();
        assert!(
            msg.contains("modprobe bksnap") && msg.contains("insmod bksnap.ko"),
            "{msg}"
        );
    }

    #[test]
    fn a_device_that_is_not_bksnap_is_refused() {
        // /dev/null answers no ioctl: ENOTTY.
        let e = super::Control::open_at(std::path::Path::new("/dev/null"))
            .err()
            .expect("not bksnap");
        assert!(e.to_string().contains("does not answer"), "{e}");
    }
}
