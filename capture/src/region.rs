//! A byte range of an open file or block device, read by absolute offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A window `[offset, offset + len)` onto a shared file handle. Reads are positioned
/// (`pread`), so one handle serves several threads and several windows at once.
#[derive(Clone, Debug)]
pub struct Region {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl Region {
    pub fn new(file: Arc<File>, offset: u64, len: u64) -> Self {
        Region { file, offset, len }
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
        Ok(Region::new(self.file.clone(), self.offset + start, len))
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
