//! Naming block devices: the module knows them by major/minor number, people by path.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{KmodError, Result};

/// A block device's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevNum {
    pub fn new(major: u32, minor: u32) -> DevNum {
        DevNum { major, minor }
    }

    /// Splits a `dev_t` (Linux/glibc encoding).
    pub fn from_dev_t(dev: u64) -> DevNum {
        DevNum {
            major: (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32,
            minor: (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32,
        }
    }

    /// The device a block special file names (`st_rdev`); anything else is refused.
    pub fn of_block_device(path: &Path) -> Result<DevNum> {
        let meta = std::fs::metadata(path)
            .map_err(|e| KmodError::io(format!("cannot stat {}", path.display()), e))?;
        if !meta.file_type().is_block_device() {
            let what = if meta.is_dir() {
                "a directory"
            } else if meta.is_file() {
                "a regular file"
            } else if meta.file_type().is_char_device() {
                "a character device"
            } else {
                "a special file"
            };
            return Err(KmodError::NotBlockDevice {
                path: path.to_path_buf(),
                why: format!(" (it is {what}; name a disk or partition such as /dev/vdb)"),
            });
        }
        Ok(DevNum::from_dev_t(meta.rdev()))
    }

    /// The device holding a file (`st_dev`).
    pub fn holding(path: &Path) -> Result<DevNum> {
        let meta = std::fs::metadata(path)
            .map_err(|e| KmodError::io(format!("cannot stat {}", path.display()), e))?;
        Ok(DevNum::from_dev_t(meta.dev()))
    }

    /// Its directory in sysfs (exists only for block devices).
    pub fn sysfs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{}:{}", self.major, self.minor))
    }

    /// Whether this number names a block device the kernel knows.
    pub fn is_block_device(&self) -> bool {
        self.major != 0 && self.sysfs().exists()
    }

    /// The device's size in 512-byte sectors, from sysfs.
    pub fn sectors(&self) -> Result<u64> {
        let file = self.sysfs().join("size");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            KmodError::io(format!("cannot read the size of block device {self}"), e)
        })?;
        text.trim().parse().map_err(|_| {
            KmodError::Invalid(format!("{}: unexpected content {text:?}", file.display()))
        })
    }

    /// The device's node under /dev, from sysfs (`DEVNAME`).
    pub fn path(&self) -> Option<PathBuf> {
        let uevent = std::fs::read_to_string(self.sysfs().join("uevent")).ok()?;
        uevent
            .lines()
            .find_map(|l| l.strip_prefix("DEVNAME="))
            .map(|name| Path::new("/dev").join(name))
    }

    /// "/dev/vdb (253:16)", or "253:16" when it has no node.
    pub fn describe(&self) -> String {
        match self.path() {
            Some(p) => format!("{} ({self})", p.display()),
            None => self.to_string(),
        }
    }

    /// The whole disk a partition belongs to (itself for a whole disk).
    pub fn whole_disk(&self) -> DevNum {
        let dir = self.sysfs();
        if !dir.join("partition").exists() {
            return *self;
        }
        std::fs::read_to_string(dir.join("../dev"))
            .ok()
            .and_then(|t| {
                let (ma, mi) = t.trim().split_once(':')?;
                Some(DevNum::new(ma.parse().ok()?, mi.parse().ok()?))
            })
            .unwrap_or(*self)
    }
}

/// Anything that names a block device: a path to its node, or its number.
pub trait AsDevice {
    fn devnum(&self) -> Result<DevNum>;
}

impl AsDevice for DevNum {
    fn devnum(&self) -> Result<DevNum> {
        Ok(*self)
    }
}

impl<T: AsRef<Path> + ?Sized> AsDevice for T {
    fn devnum(&self) -> Result<DevNum> {
        DevNum::of_block_device(self.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_encoding() {
        // makedev(8, 16), makedev(259, 1), makedev(4095, 1048575) as glibc encodes them.
        let make = |ma: u64, mi: u64| {
            ((ma & 0xffff_f000) << 32)
                | ((ma & 0xfff) << 8)
                | ((mi & 0xffff_ff00) << 12)
                | (mi & 0xff)
        };
        for (ma, mi) in [(8, 16), (259, 1), (253, 300), (4095, 1_048_575), (0, 0)] {
            assert_eq!(
                DevNum::from_dev_t(make(ma, mi)),
                DevNum::new(ma as u32, mi as u32)
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        for p in [dir.path(), file.as_path(), Path::new("/dev/null")] {
            let e = DevNum::of_block_device(p).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Refused, "{e}");
            assert!(e.to_string().contains("is not a block device"), "{e}");
        }
        let e = DevNum::of_block_device(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_is_held_by_a_device() {
        let dev = DevNum::holding(Path::new("/proc/self/exe")).unwrap();
        // Whatever it is, it converts back and forth.
        let _ = dev.describe();
    }
}
