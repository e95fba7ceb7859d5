//! Opening what the user names as a SOURCE: a block device or an image file.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::region::{Direct, Region};

pub struct Source {
    pub path: PathBuf,
    pub region: Region,
    pub logical_sector_size: u32,
    pub is_block_device: bool,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .with_context(|| format!("cannot open source {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat source {}", path.display()))?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            bail!(
                "source {} is neither a block device nor a regular image file",
                path.display()
            );
        }
        let size = size_of(&file, path)?;
        if size == 0 {
            bail!("source {} is empty (0 bytes)", path.display());
        }
        let logical_sector_size = if is_block_device {
            sysfs_sector_size(meta.rdev()).unwrap_or(512)
        } else {
            512
        };
        Ok(Source {
            path: path.to_path_buf(),
            region: with_direct(Region::new(Arc::new(file), 0, size), path),
            logical_sector_size,
            is_block_device,
        })
    }

    /// Fails if the source's size is no longer what it was when opened.
    pub fn check_size_unchanged(&self) -> Result<()> {
        let now = size_of(self.region.file(), &self.path)?;
        if now != self.region.len() {
            bail!(
                "source {} changed size during capture ({} -> {} bytes); nothing was committed: \
                 capture from a snapshot or a quiet device",
                self.path.display(),
                self.region.len(),
                now
            );
        }
        Ok(())
    }
}

/// Adds an O_DIRECT handle when the kernel allows one for this file (tmpfs, for one,
/// does not): bulk chunk reads then skip the page cache copy.
fn with_direct(region: Region, path: &Path) -> Region {
    match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => region.with_direct(Arc::new(Direct::new(f))),
        Err(_) => region,
    }
}

fn size_of(file: &File, path: &Path) -> Result<u64> {
    // Seeking to the end gives the size of block devices and regular files alike.
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .with_context(|| format!("cannot find the size of {}", path.display()))
}

/// Logical sector size of a block device, from sysfs (partitions inherit the disk's).
fn sysfs_sector_size(rdev: u64) -> Option<u32> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    for queue in [dev.join("queue"), dev.join("../queue")] {
        if let Ok(text) = std::fs::read_to_string(queue.join("logical_block_size")) {
            return text.trim().parse().ok();
        }
    }
    None
}
