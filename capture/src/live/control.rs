//! The kernel side of a live capture, as a trait: the few bksnap operations a session
//! uses, so that its state machine can be tested against a fake control device.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bkimg_kmod::{
    Control, DevNum, Event, Extent, KmodError, SnapshotInfo, SnapshotOptions, TrackerState,
};

/// What a live session asks of the bksnap module. [`Control`] is the real one.
pub trait SnapshotControl: Send + Sync {
    /// A tracker's state, with its table if `with_table`.
    fn read(&self, dev: DevNum, with_table: bool) -> Result<TrackerState, KmodError>;
    /// Starts tracking `dev` (a new generation).
    fn attach(&self, dev: DevNum) -> Result<(), KmodError>;
    /// One snapshot of all `devs` at one instant; its id.
    fn create(
        &self,
        devs: &[DevNum],
        store: &[Extent],
        opts: SnapshotOptions,
    ) -> Result<u64, KmodError>;
    fn info(&self, id: u64) -> Result<SnapshotInfo, KmodError>;
    fn destroy(&self, id: u64) -> Result<(), KmodError>;
    /// Adds extents to a live snapshot's store.
    fn store_add(&self, id: u64, extents: &[Extent]) -> Result<(), KmodError>;
    /// The next event of snapshot `id`, waiting up to `timeout`.
    fn wait_event(&self, timeout: Duration, id: u64) -> Result<Option<Event>, KmodError>;
    /// Returns once every image of the snapshot can be opened by its path.
    fn wait_for_images(&self, info: &SnapshotInfo) -> Result<()> {
        wait_for_images(info)
    }
}

impl SnapshotControl for Control {
    fn read(&self, dev: DevNum, with_table: bool) -> Result<TrackerState, KmodError> {
        Control::read(self, dev, with_table)
    }
    fn attach(&self, dev: DevNum) -> Result<(), KmodError> {
        Control::attach(self, dev, 0).map(|_| ())
    }
    fn create(
        &self,
        devs: &[DevNum],
        store: &[Extent],
        opts: SnapshotOptions,
    ) -> Result<u64, KmodError> {
        Control::create(self, devs, store, opts)
    }
    fn info(&self, id: u64) -> Result<SnapshotInfo, KmodError> {
        Control::info(self, id)
    }
    fn destroy(&self, id: u64) -> Result<(), KmodError> {
        Control::destroy(self, id)
    }
    fn store_add(&self, id: u64, extents: &[Extent]) -> Result<(), KmodError> {
        Control::store_add(self, id, extents)
    }
    fn wait_event(&self, timeout: Duration, id: u64) -> Result<Option<Event>, KmodError> {
        Control::wait_event(self, timeout, id)
    }
}

/// Waits (up to 10 s) until every image's device node exists and is that image.
pub fn wait_for_images(info: &SnapshotInfo) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in &info.devs {
        loop {
            match DevNum::of_block_device(&d.image_path) {
                Ok(n) if n == d.image => break,
                Ok(n) => bail!(
                    "{} is device {n}, not the image {} of snapshot {}: remove the stale node",
                    d.image_path.display(),
                    d.image,
                    info.id
                ),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "the image {} of snapshot {} (device {}) has no node in /dev: is \
                         devtmpfs mounted or udev running?",
                        d.image_path.display(),
                        info.id,
                        d.image
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Why a snapshot failed, in words.
pub fn failure_text(info: &SnapshotInfo) -> String {
    let cause = if info.error == -nix::libc::ENOSPC {
        format!(
            "its difference store ({}) was full",
            human_bytes(info.store_sectors * 512)
        )
    } else {
        format!(
            "{}: a store or device I/O failed or took longer than 30 s",
            info.error_text().unwrap_or_else(|| "unknown error".into())
        )
    };
    format!(
        "snapshot {} failed: {cause}; its images return errors from then on",
        info.id
    )
}

/// Whether `path` lives on one of `devices` (or on a partition of a disk among them, or
/// the disk of a partition among them).
pub fn store_overlaps(path: &Path, devices: &[DevNum]) -> Option<DevNum> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let holder = DevNum::holding(dir).ok()?;
    devices
        .iter()
        .copied()
        .find(|d| *d == holder || d.whole_disk() == holder || holder.whole_disk() == *d)
}

/// Bytes in binary units, written as the CLI's progress output writes them ("1.46 KiB").
pub fn human_bytes(n: u64) -> String {
    const PREFIXES: [&str; 8] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < PREFIXES.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.2} {}B", PREFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_like_the_progress_output() {
        assert_eq!(human_bytes(15), "15 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1_500), "1.46 KiB");
        assert_eq!(human_bytes(1_500_000), "1.43 MiB");
        assert_eq!(human_bytes(1_500_000_000), "1.40 GiB");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
        assert_eq!(human_bytes(1_500_000_000_000_000), "1.33 PiB");
    }
}
