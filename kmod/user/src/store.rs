//! The difference store as a file: created and preallocated (`fallocate`) by us, its
//! physical extents found with `FIEMAP`, handed to the module as raw sectors of the block
//! device that holds the file. The file stays open and allocated while a snapshot uses
//! it; it is removed when dropped (unless kept).
//!
//! While it exists the file is immutable (`FS_IMMUTABLE_FL`, where the filesystem has
//! the flag): the kernel writes into its blocks behind the filesystem's back, so nobody,
//! root included, may truncate, punch, rename or unlink it until we lift the flag, which
//! we do only to grow it and just before removing it (after the snapshot is gone). A store
//! left behind by a killed process stays immutable: `bkimg snapshot destroy --store`
//! removes it once the snapshot is released.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use crate::control::Extent;
use crate::device::DevNum;
use crate::error::{KmodError, Result};
use crate::sys;

/// Store sizes are rounded up to this (a whole number of the largest copy-on-write
/// chunk, so no extent ends in an unusable tail because of the size).
pub const STORE_ALIGN: u64 = 1 << 20;

/// Extent flags that make the physical address meaningless or the blocks not ours alone.
const REFUSED_FLAGS: [(u32, &str); 7] = [
    (sys::FIEMAP_EXTENT_UNKNOWN, "location unknown"),
    (
        sys::FIEMAP_EXTENT_DELALLOC,
        "not allocated yet (delayed allocation)",
    ),
    (
        sys::FIEMAP_EXTENT_ENCODED,
        "encoded (compressed or encrypted by the filesystem)",
    ),
    (sys::FIEMAP_EXTENT_DATA_INLINE, "stored inline in metadata"),
    (sys::FIEMAP_EXTENT_NOT_ALIGNED, "not block-aligned"),
    (
        sys::FIEMAP_EXTENT_DATA_TAIL,
        "packed into a shared tail block",
    ),
    (
        sys::FIEMAP_EXTENT_SHARED,
        "shared with other files (reflink or snapshot)",
    ),
];

pub struct StoreFile {
    path: PathBuf,
    file: File,
    dev: DevNum,
    size: u64,
    extents: Vec<Extent>,
    keep: bool,
}

impl StoreFile {
    /// Creates `path` (an existing file is refused: it may be someone's data), allocates
    /// `size` bytes (rounded up to 1 MiB), makes the allocation durable and maps it.
    pub fn create(path: &Path, size: u64) -> Result<StoreFile> {
        if size == 0 {
            return Err(KmodError::store(path, "the size must not be zero"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => KmodError::store(
                    path,
                    "already exists: name a new file (bkimg creates the store and removes it \
                     afterwards, and never overwrites an existing file)",
                ),
                _ => KmodError::io(format!("cannot create store file {}", path.display()), e),
            })?;
        // From here on, dropping `store` removes the file.
        let mut store = StoreFile {
            path: path.to_path_buf(),
            file,
            dev: DevNum::new(0, 0),
            size: 0,
            extents: Vec::new(),
            keep: false,
        };
        store.dev = store_device(path)?;
        store.grow(size)?;
        Ok(store)
    }

    /// Opens a store file created earlier (by `bkimg snapshot create`) to grow it; it is
    /// kept when dropped.
    pub fn open(path: &Path) -> Result<StoreFile> {
        let open_err = |e| KmodError::io(format!("cannot open store file {}", path.display()), e);
        // An immutable file cannot be opened for writing: opened for reading first, the
        // flag lifted for the moment of the second open, then set again.
        let ro = std::fs::File::open(path).map_err(open_err)?;
        let immutable = sys::inode_flags(&ro).is_ok_and(|f| f & sys::FS_IMMUTABLE_FL != 0);
        if immutable {
            let flags = sys::inode_flags(&ro).unwrap_or(0);
            sys::set_inode_flags(&ro, flags & !sys::FS_IMMUTABLE_FL).map_err(|e| {
                KmodError::store(
                    path,
                    format!("cannot clear the immutable flag: {}", e.desc()),
                )
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path);
        if immutable {
            let flags = sys::inode_flags(&ro).unwrap_or(0);
            let _ = sys::set_inode_flags(&ro, flags | sys::FS_IMMUTABLE_FL);
        }
        let file = file.map_err(open_err)?;
        let meta = file
            .metadata()
            .map_err(|e| KmodError::io(format!("cannot stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(KmodError::store(path, "is not a regular file"));
        }
        let dev = store_device(path)?;
        let size = meta.len();
        let extents = map_range(&file, path, dev, 0, size)?;
        Ok(StoreFile {
            path: path.to_path_buf(),
            file,
            dev,
            size,
            extents,
            keep: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The block device holding the file, which the extents are sectors of.
    pub fn dev(&self) -> DevNum {
        self.dev
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Every extent of the file, in file order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Allocates `extra` more bytes (rounded up to 1 MiB) and returns the new extents only.
    pub fn grow(&mut self, extra: u64) -> Result<Vec<Extent>> {
        let too_big = || KmodError::store(&self.path, format!("cannot grow by {extra} bytes"));
        let extra = extra
            .checked_next_multiple_of(STORE_ALIGN)
            .filter(|e| *e > 0)
            .ok_or_else(too_big)?;
        // fallocate takes signed offsets: the end must fit in an i64.
        let end = self
            .size
            .checked_add(extra)
            .filter(|e| i64::try_from(*e).is_ok())
            .ok_or_else(too_big)?;
        // The flag is lifted for the allocation only (fallocate is refused on an immutable
        // file) and set again whatever happened.
        self.set_immutable(false)?;
        let grown = self.allocate(extra, end);
        self.set_immutable(true)?;
        grown
    }

    fn allocate(&mut self, extra: u64, end: u64) -> Result<Vec<Extent>> {
        let start = self.size;
        let fd = self.file.as_raw_fd();
        nix::fcntl::fallocate(fd, FallocateFlags::empty(), start as i64, extra as i64).map_err(
            |e| {
                let why = match e {
                    Errno::ENOSPC => format!(
                        "not enough free space for {} more MiB on its filesystem: choose a \
                         smaller size or another place",
                        extra >> 20
                    ),
                    Errno::EOPNOTSUPP => "its filesystem cannot preallocate (fallocate): put \
                                          the store on ext4 or XFS"
                        .into(),
                    e => format!("cannot allocate {} MiB: {}", extra >> 20, e.desc()),
                };
                KmodError::store(&self.path, why)
            },
        )?;
        self.file
            .sync_all()
            .map_err(|e| KmodError::io(format!("cannot fsync {}", self.path.display()), e))?;
        self.size = end;
        let new = map_range(&self.file, &self.path, self.dev, start, end)?;
        for e in &new {
            push_merged(&mut self.extents, *e);
        }
        Ok(new)
    }

    /// Keep the file when dropped (it outlives this process: `bkimg snapshot create`).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// Sets or lifts `FS_IMMUTABLE_FL`. A filesystem without inode flags (ENOTTY,
    /// EOPNOTSUPP) is accepted: the protection is then absent, not the store.
    fn set_immutable(&self, on: bool) -> Result<()> {
        let fail = |e: Errno| {
            KmodError::store(
                &self.path,
                format!(
                    "cannot {} the immutable flag: {}",
                    if on { "set" } else { "clear" },
                    e.desc()
                ),
            )
        };
        let flags = match sys::inode_flags(&self.file) {
            Ok(f) => f,
            Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => return Ok(()),
            Err(e) => return Err(fail(e)),
        };
        let want = if on {
            flags | sys::FS_IMMUTABLE_FL
        } else {
            flags & !sys::FS_IMMUTABLE_FL
        };
        if want == flags {
            return Ok(());
        }
        sys::set_inode_flags(&self.file, want).map_err(fail)
    }

    /// Whether the file is immutable now (false where the filesystem has no flags).
    pub fn is_immutable(&self) -> bool {
        sys::inode_flags(&self.file).is_ok_and(|f| f & sys::FS_IMMUTABLE_FL != 0)
    }

    /// Removes the file now (lifting the immutable flag first).
    pub fn remove(mut self) -> Result<()> {
        self.keep = true; // Drop does nothing more.
        self.set_immutable(false)?;
        std::fs::remove_file(&self.path).map_err(|e| {
            KmodError::io(
                format!("cannot remove store file {}", self.path.display()),
                e,
            )
        })
    }
}

/// Removes a store file by path, lifting its immutable flag first (a caller that no longer
/// holds the [`StoreFile`], once no snapshot can write to it).
pub fn remove_store_path(path: &Path) -> std::io::Result<()> {
    if let Ok(f) = std::fs::File::open(path) {
        if let Ok(flags) = sys::inode_flags(&f) {
            if flags & sys::FS_IMMUTABLE_FL != 0 {
                sys::set_inode_flags(&f, flags & !sys::FS_IMMUTABLE_FL)?;
            }
        }
    }
    std::fs::remove_file(path)
}

impl Drop for StoreFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.set_immutable(false);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The block device whose sectors FIEMAP's physical addresses are: the one holding the
/// file. Filesystems not on one block device (btrfs, tmpfs, network) are refused.
fn store_device(path: &Path) -> Result<DevNum> {
    let dev = DevNum::holding(path)?;
    if !dev.is_block_device() {
        return Err(KmodError::store(
            path,
            format!(
                "its filesystem is not on a single block device (device {dev}: btrfs, \
                 tmpfs, overlay or a network filesystem?): put the store on ext4 or XFS"
            ),
        ));
    }
    Ok(dev)
}

/// Appends an extent, merging it into the last one when they are physically adjacent.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.dev == e.dev && last.sector + last.sectors == e.sector {
            last.sectors += e.sectors;
            return;
        }
    }
    out.push(e);
}

/// The physical extents of the file's bytes `[start, end)`, as sectors of `dev`. Every
/// byte must be allocated, on extents of this file alone, at 512-byte boundaries.
fn map_range(file: &File, path: &Path, dev: DevNum, start: u64, end: u64) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut cursor = start;
    while cursor < end {
        let batch = sys::fiemap(file, cursor, end - cursor, sys::FIEMAP_FLAG_SYNC).map_err(
            |e| match e {
                Errno::EOPNOTSUPP | Errno::ENOTTY => KmodError::store(
                    path,
                    "its filesystem cannot report where the file lies (no FIEMAP): put the \
                     store on ext4 or XFS",
                ),
                e => KmodError::store(path, format!("FIEMAP failed: {}", e.desc())),
            },
        )?;
        if batch.is_empty() {
            return Err(KmodError::store(
                path,
                format!("byte {cursor} is not allocated (a hole after fallocate)"),
            ));
        }
        for fe in batch {
            if let Some((_, why)) = REFUSED_FLAGS.iter().find(|(f, _)| fe.fe_flags & f != 0) {
                return Err(KmodError::store(
                    path,
                    format!(
                        "the extent at byte {} is {why}: its sectors cannot be written raw; \
                         put the store on ext4 or XFS",
                        fe.fe_logical
                    ),
                ));
            }
            let fe_end = fe.fe_logical.saturating_add(fe.fe_length);
            if fe_end <= cursor {
                continue;
            }
            if fe.fe_logical > cursor {
                return Err(KmodError::store(
                    path,
                    format!("bytes {cursor} to {} are not allocated", fe.fe_logical),
                ));
            }
            let hi = fe_end.min(end);
            let phys = fe.fe_physical + (cursor - fe.fe_logical);
            let len = hi - cursor;
            if phys & 511 != 0 || len & 511 != 0 {
                return Err(KmodError::store(
                    path,
                    format!("the extent at byte {cursor} is not aligned to 512-byte sectors"),
                ));
            }
            push_merged(
                &mut out,
                Extent {
                    dev,
                    sector: phys / 512,
                    sectors: len / 512,
                },
            );
            cursor = hi;
            if cursor >= end {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// A directory on a filesystem with FIEMAP, or None (the reason printed).
    fn fiemap_dir() -> Option<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("bkimg-kmod-test")
            .tempdir_in("/var/tmp")
            .ok()?;
        let probe = dir.path().join("probe");
        let f = std::fs::File::create(&probe).ok()?;
        f.set_len(4096).ok()?;
        match sys::fiemap(&f, 0, 4096, 0) {
            Err(e) => {
                eprintln!("skipped: FIEMAP unsupported on /var/tmp ({e})");
                None
            }
            Ok(_) => {
                let dev = DevNum::holding(&probe).ok()?;
                if !dev.is_block_device() {
                    eprintln!("skipped: /var/tmp is not on a block device ({dev})");
                    return None;
                }
                Some(dir)
            }
        }
    }

    fn sectors(extents: &[Extent]) -> u64 {
        extents.iter().map(|e| e.sectors).sum()
    }

    #[test]
    fn create_grow_and_remove() {
        let Some(dir) = fiemap_dir() else { return };
        let path = dir.path().join("store");
        let mut s = StoreFile::create(&path, 5 << 20).unwrap();
        assert_eq!(s.size(), 5 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5 << 20);
        assert_eq!(sectors(s.extents()), (5 << 20) / 512);
        assert_eq!(s.dev(), DevNum::holding(&path).unwrap());
        assert!(s
            .extents()
            .iter()
            .all(|e| e.dev == s.dev() && e.sectors > 0));

        // Rounded up to a MiB; only the new extents are returned.
        let new = s.grow(3 << 20).unwrap();
        assert_eq!(sectors(&new), (3 << 20) / 512);
        assert_eq!(s.size(), 8 << 20);
        assert_eq!(sectors(s.extents()), (8 << 20) / 512);
        let new = s.grow(1).unwrap();
        assert_eq!(sectors(&new), (1 << 20) / 512);

        // No extent overlaps another.
        let mut all: Vec<_> = s.extents().to_vec();
        all.sort_by_key(|e| e.sector);
        for w in all.windows(2) {
            assert!(w[0].sector + w[0].sectors <= w[1].sector, "{all:?}");
        }

        // Immutable while it exists: not even root can remove or truncate it.
        if s.is_immutable() {
            let e = std::fs::remove_file(&path).expect_err("immutable");
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            assert!(std::fs::OpenOptions::new().write(true).open(&path).is_err());
        } else {
            eprintln!("note: /var/tmp has no inode flags: immutability not checked");
        }

        // An existing file is refused and left alone.
        let e = StoreFile::create(&path, 1 << 20).err().expect("refused");
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(path.exists());

        // Reopened by path: same extents, still immutable, can grow, and kept on drop.
        let mut reopened = StoreFile::open(&path).unwrap();
        assert_eq!(reopened.extents(), s.extents());
        assert_eq!(reopened.is_immutable(), s.is_immutable());
        reopened.grow(1 << 20).unwrap();
        assert_eq!(reopened.is_immutable(), s.is_immutable());
        drop(reopened);
        assert!(path.exists());

        drop(s);
        assert!(!path.exists(), "dropping removes the file");

        let mut kept = StoreFile::create(&path, 1 << 20).unwrap();
        kept.keep(true);
        drop(kept);
        assert!(path.exists());
        StoreFile::open(&path).unwrap().remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn refuses_zero_size_and_non_block_filesystems() {
        let Some(dir) = fiemap_dir() else { return };
        let e = StoreFile::create(&dir.path().join("z"), 0)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("zero"), "{e}");
        assert!(!dir.path().join("z").exists());
        // /dev/shm, /proc: not on a block device.
        if Path::new("/dev/shm").is_dir() {
            let p = Path::new("/dev/shm").join(format!("bkimg-store-test-{}", std::process::id()));
            let e = StoreFile::create(&p, 1 << 20).err().expect("refused");
            assert!(
                e.to_string().contains("not on a single block device"),
                "{e}"
            );
            assert!(!p.exists(), "the refused file is removed");
        }
    }

    /// The sectors FIEMAP gives hold the file's bytes on the device (needs to read the
    /// device: root).
    #[test]
    fn extents_are_where_the_bytes_are() {
        let Some(dir) = fiemap_dir() else { return };
        let path = dir.path().join("data");
        let len: usize = 3 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let dev = DevNum::holding(&path).unwrap();
        let extents = map_range(&f, &path, dev, 0, len as u64).unwrap();
        assert_eq!(sectors(&extents), len as u64 / 512);
        let Some(node) = dev.path() else {
            eprintln!("skipped: no device node for {dev}");
            return;
        };
        let mut disk = match std::fs::File::open(&node) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: cannot read {} ({e})", node.display());
                return;
            }
        };
        // Not from a stale page cache of the device.
        let _ = nix::fcntl::posix_fadvise(
            disk.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        let mut at = 0usize;
        for e in &extents {
            let n = (e.sectors * 512) as usize;
            let mut buf = vec![0u8; n];
            disk.seek(SeekFrom::Start(e.sector * 512)).unwrap();
            disk.read_exact(&mut buf).unwrap();
            assert!(buf == data[at..at + n], "extent {e:?} holds other bytes");
            at += n;
        }
        assert_eq!(at, len);
    }
}
