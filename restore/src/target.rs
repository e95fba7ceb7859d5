//! Opening the disk or image file a restore writes to, with every check made before the
//! first byte is written: right kind, large enough, not mounted, not open elsewhere.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("target {path} is {have} bytes but the restore needs at least {need} bytes ({need_h}): use a larger disk or image")]
    TooSmall {
        path: String,
        have: u64,
        need: u64,
        need_h: String,
    },
    #[error("target {path} is in use ({why}): unmount it and stop what holds it, then retry")]
    InUse { path: String, why: String },
    #[error("target {path} is not a block device or regular file")]
    WrongKind { path: String },
    #[error("target {path} has {have}-byte sectors but the disk was captured with {need}-byte sectors: its partition table would not be found; use a device with {need}-byte sectors or restore to an image file")]
    SectorSize { path: String, have: u32, need: u32 },
    #[error("{path} is named by more than one --target: each disk needs its own target")]
    Duplicate { path: String },
    #[error("cannot open target {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Target {
    pub path: PathBuf,
    pub file: File,
    /// The same file opened again with O_DIRECT, for bulk writes that skip the page cache
    /// (no copy, no writeback storm at the final sync); None where the kernel refuses it.
    direct: Option<File>,
    pub size: u64,
    pub is_block_device: bool,
    /// Created by this restore: holes need no writing.
    pub fresh: bool,
}

impl Target {
    /// Every check [`Target::open`] makes before it writes: kind, mounts, sector size,
    /// size. Creates and writes nothing. Returns whether the target would be created.
    pub fn check(path: &Path, need: u64, sector: Option<u32>) -> Result<bool, TargetError> {
        let p = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(source) => return Err(TargetError::Open { path: p, source }),
        };
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(TargetError::WrongKind { path: p });
        }
        if is_block_device {
            if let Some(why) = mounted(meta.rdev()) {
                return Err(TargetError::InUse { path: p, why });
            }
            check_sector(&p, meta.rdev(), sector)?;
        } else if let Some(dev) = bkimg_format::loopdev::over(&meta).into_iter().next() {
            // A filesystem may be mounted from it, or a program may hold the loop device.
            return Err(TargetError::InUse {
                path: p,
                why: format!(
                    "it is the backing file of {dev}: unmount what is mounted from {dev} and \
                     detach it with `losetup -d {dev}`"
                ),
            });
        }
        let size = File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(|source| TargetError::Open {
                path: p.clone(),
                source,
            })?;
        if size < need {
            return Err(TargetError::TooSmall {
                path: p,
                have: size,
                need,
                need_h: indicatif::HumanBytes(need).to_string(),
            });
        }
        Ok(false)
    }

    /// Opens `path` for writing at least `need` bytes. A missing path becomes a new sparse
    /// image file of `create_size` bytes (None: refuse to create). A block device must
    /// have `sector`-byte logical sectors when given.
    pub fn open(
        path: &Path,
        need: u64,
        create_size: Option<u64>,
        sector: Option<u32>,
    ) -> Result<Target, TargetError> {
        let p = path.display().to_string();
        let open_err = |source| TargetError::Open {
            path: p.clone(),
            source,
        };
        if Self::check(path, need, sector)? {
            let size = create_size.ok_or_else(|| {
                open_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "it does not exist",
                ))
            })?;
            let file = create_sized(path, size).map_err(open_err)?;
            return Ok(Target {
                path: path.to_path_buf(),
                direct: reopen_direct(&file),
                file,
                size,
                is_block_device: false,
                fresh: true,
            });
        }
        let is_block_device = std::fs::metadata(path)
            .map_err(open_err)?
            .file_type()
            .is_block_device();
        // O_EXCL on a block device fails with EBUSY while it or a partition of it is
        // mounted or claimed by another exclusive opener (device-mapper, md, a mount).
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if is_block_device {
            opts.custom_flags(libc_o_excl());
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                TargetError::InUse {
                    path: p.clone(),
                    why: "the kernel reports it busy: mounted, or held by another program".into(),
                }
            } else {
                open_err(e)
            }
        })?;
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(Target {
            path: path.to_path_buf(),
            direct: reopen_direct(&file),
            file,
            size,
            is_block_device,
            fresh: false,
        })
    }

    /// Writes `data` at `offset`: directly when the buffer, offset and length are aligned
    /// for O_DIRECT (bulk chunk writes from an [`bkimg_format::buf::AlignedBuf`]), through
    /// the page cache otherwise. The same bytes land either way; [`Target::file`]'s
    /// `sync_all` makes both durable.
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        use bkimg_format::buf::ALIGN;
        use std::os::unix::fs::FileExt;
        if let Some(direct) = &self.direct {
            let aligned = (data.as_ptr() as usize).is_multiple_of(ALIGN)
                && data.len().is_multiple_of(ALIGN)
                && offset.is_multiple_of(ALIGN as u64);
            if aligned {
                if !self.is_block_device {
                    // Allocating first lets ext4 and XFS take the file's lock shared for
                    // the direct write; a write that allocates takes it exclusively for
                    // the whole I/O, which serialises every writer on one file.
                    use std::os::fd::AsRawFd;
                    let _ = nix::fcntl::fallocate(
                        direct.as_raw_fd(),
                        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        offset as i64,
                        data.len() as i64,
                    );
                }
                match direct.write_all_at(data, offset) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                    other => return other,
                }
            }
        }
        self.file.write_all_at(data, offset)
    }
}

/// A second, O_DIRECT descriptor for an open target, through /proc/self/fd (the first
/// keeps its exclusive claim on a block device; this one needs none).
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

fn check_sector(path: &str, rdev: u64, need: Option<u32>) -> Result<(), TargetError> {
    let Some(need) = need else { return Ok(()) };
    match sector_size(rdev) {
        Some(have) if have != need => Err(TargetError::SectorSize {
            path: path.to_string(),
            have,
            need,
        }),
        _ => Ok(()),
    }
}

/// Logical sector size of a block device from sysfs (partitions inherit the disk's).
fn sector_size(rdev: u64) -> Option<u32> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    [dev.join("queue"), dev.join("../queue")]
        .iter()
        .find_map(|q| std::fs::read_to_string(q.join("logical_block_size")).ok())
        .and_then(|t| t.trim().parse().ok())
}

/// The identity of an existing path (device number for devices, inode for files), so two
/// spellings of one target are recognised.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some(if m.file_type().is_block_device() {
        (u64::MAX, m.rdev())
    } else {
        (m.dev(), m.ino())
    })
}

/// Creates `path` as a sparse file of `size` bytes, all at once: the name appears only
/// with the full size, so a restore killed while creating it leaves no short file that a
/// rerun would refuse as too small. The file is made unnamed (`O_TMPFILE`) in the target
/// directory, sized, then linked in (failing, like `create_new`, if the name exists);
/// filesystems without `O_TMPFILE` get a plain exclusive create.
fn create_sized(path: &Path, size: u64) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let unnamed = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_TMPFILE)
        .mode(0o644)
        .open(dir);
    match unnamed {
        Ok(file) => {
            file.set_len(size)?;
            let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            nix::unistd::linkat(
                None,
                Path::new(&fd_path),
                None,
                path,
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            )?;
            Ok(file)
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EOPNOTSUPP) | Some(nix::libc::EISDIR) | Some(nix::libc::EINVAL)
            ) =>
        {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?;
            file.set_len(size)?;
            Ok(file)
        }
        Err(e) => Err(e),
    }
}

fn libc_o_excl() -> i32 {
    nix::libc::O_EXCL
}

/// Whether the device or any partition on it is mounted, from /proc/self/mountinfo.
fn mounted(rdev: u64) -> Option<String> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let mut devs = vec![format!("{major}:{minor}")];
    // Partitions of a whole disk are listed as subdirectories with a "dev" file.
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            if let Ok(dev) = std::fs::read_to_string(e.path().join("dev")) {
                devs.push(dev.trim().to_string());
            }
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 4 && devs.iter().any(|d| d == f[2]))
            .then(|| format!("device {} is mounted on {}", f[2], f[4]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_image_appears_with_its_full_size_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.img");
        let file = create_sized(&path, 5 << 20).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 5 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 << 20);
        // Sparse: nothing allocated yet.
        assert_eq!(std::fs::metadata(&path).unwrap().blocks(), 0);
        // Only entry in the directory: no temporary name left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // An existing name is refused and left as it was.
        std::fs::write(dir.path().join("old.img"), b"keep").unwrap();
        let e = create_sized(&dir.path().join("old.img"), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("old.img")).unwrap(), b"keep");
    }
}
