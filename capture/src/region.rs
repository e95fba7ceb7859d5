//! A byte range of an open file or block device, read by absolute offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bkimg_format::buf::{AlignedBuf, ALIGN as DIRECT_ALIGN};

/// A window `[offset, offset + len)` onto a shared file handle. Reads are positioned
/// (`pread`), so one handle serves several threads and several windows at once.
#[derive(Clone, Debug)]
pub struct Region {
    file: Arc<File>,
    /// A second handle on the same file opened with O_DIRECT, for bulk reads that bypass
    /// the page cache (no copy, no cache pollution); given up at the first refusal.
    direct: Option<Arc<Direct>>,
    offset: u64,
    len: u64,
}

#[derive(Debug)]
pub struct Direct {
    file: File,
    usable: AtomicBool,
}

impl Direct {
    pub fn new(file: File) -> Direct {
        Direct {
            file,
            usable: AtomicBool::new(true),
        }
    }
}

impl Region {
    pub fn new(file: Arc<File>, offset: u64, len: u64) -> Self {
        Region {
            file,
            direct: None,
            offset,
            len,
        }
    }

    /// Adds an O_DIRECT handle on the same file for [`Region::read_into`].
    pub fn with_direct(mut self, direct: Arc<Direct>) -> Self {
        self.direct = Some(direct);
        self
    }

    /// Reads `len` bytes at `pos` into `buf`: directly (no page cache) when the handle,
    /// offset and length allow it, else through the page cache. The same bytes either way.
    pub fn read_into(&self, buf: &mut AlignedBuf, pos: u64, len: usize) -> io::Result<()> {
        buf.prepare(len);
        if let Some(d) = &self.direct {
            let at = self.offset + pos;
            let aligned =
                at.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN);
            if aligned && d.usable.load(Ordering::Relaxed) && pos + len as u64 <= self.len {
                match d.file.read_exact_at(buf.data_mut(), at) {
                    Ok(()) => return Ok(()),
                    // The filesystem or device refuses direct I/O (or this alignment):
                    // stop trying and read through the cache from now on.
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        d.usable.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.read_exact_at(buf.data_mut(), pos)
    }

    /// Whether bulk reads bypass the page cache (so read-ahead hints are pointless).
    pub fn is_direct(&self) -> bool {
        self.direct
            .as_ref()
            .is_some_and(|d| d.usable.load(Ordering::Relaxed))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of this window within the underlying file or device.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A narrower window, `[start, start + len)` relative to this one.
    pub fn sub(&self, start: u64, len: u64) -> io::Result<Region> {
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| out_of_range(start, len, self.len))?;
        let _ = end;
        Ok(Region {
            file: self.file.clone(),
            direct: self.direct.clone(),
            offset: self.offset + start,
            len,
        })
    }

    /// Reads exactly `buf.len()` bytes at `pos` (relative to the window). Reading past the
    /// window's end is an error, not a short read: callers size their buffers from `len()`.
    pub fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        if pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(out_of_range(pos, n, self.len));
        }
        self.file.read_exact_at(buf, self.offset + pos)
    }

    /// Reads `len` bytes at `pos` into a new buffer.
    pub fn read_vec(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, pos)?;
        Ok(buf)
    }
}

fn out_of_range(pos: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at {pos} is beyond the end of a {size}-byte region"),
    )
}
