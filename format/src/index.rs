//! Volume index: which chunk holds each `chunk_size` slice of a volume.
//!
//! A 128-byte header then one 32-byte digest per chunk, in volume order. The index's
//! identity is the SHA-256 of its header, and the header holds the SHA-256 of the entries,
//! so one digest commits to the whole index and an index can be written in one pass.

use std::io::{Read, Seek, SeekFrom, Write};

use crate::chunk::{u32_at, u64_at};
use crate::digest::{Digest, Hasher};
use crate::error::{FormatError, Result};
use crate::{magic, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

pub const HEADER_LEN: usize = 128;
pub const ENTRY_LEN: usize = 32;
pub const VERSION: u32 = 1;
/// Largest volume an index may describe (bounds `entry_count` before anything is read).
pub const MAX_VOLUME_SIZE: u64 = 1 << 56;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub volume_size: u64,
    pub chunk_size: u32,
    pub entries_digest: Digest,
}

impl IndexHeader {
    pub fn entry_count(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.chunk_size))
    }

    /// Length in bytes of the chunk at `entry` (the last one may be short).
    pub fn chunk_len(&self, entry: u64) -> u32 {
        let start = entry * u64::from(self.chunk_size);
        (self.volume_size - start).min(u64::from(self.chunk_size)) as u32
    }

    pub fn object_len(&self) -> u64 {
        HEADER_LEN as u64 + self.entry_count() * ENTRY_LEN as u64
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&magic::INDEX);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.volume_size.to_le_bytes());
        h[24..28].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.entry_count().to_le_bytes());
        h[40..72].copy_from_slice(&self.entries_digest.0);
        let crc = crc32fast::hash(&h[..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The index's identity: SHA-256 of the encoded header.
    pub fn id(&self) -> Digest {
        Digest::of_bytes(&self.encode())
    }

    pub fn parse(h: &[u8]) -> Result<IndexHeader> {
        let bad = |d: String| FormatError::corrupt("volume index header", d);
        if h.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, need {HEADER_LEN}", h.len())));
        }
        if h[..8] != magic::INDEX {
            return Err(bad("wrong magic number".into()));
        }
        if crc32fast::hash(&h[..124]) != u32_at(h, 124) {
            return Err(bad("header checksum mismatch".into()));
        }
        let version = u32_at(h, 8);
        if version != VERSION {
            return Err(FormatError::unsupported(
                "volume index",
                format!("index format version {version}"),
            ));
        }
        let flags = u32_at(h, 12);
        if flags != 0 {
            return Err(FormatError::unsupported(
                "volume index",
                format!("unknown index flags {flags:#x}"),
            ));
        }
        if h[28..32] != [0; 4] || h[72..124].iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let header = IndexHeader {
            volume_size: u64_at(h, 16),
            chunk_size: u32_at(h, 24),
            entries_digest: Digest(h[40..72].try_into().expect("32 bytes")),
        };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&header.chunk_size)
            || !header.chunk_size.is_power_of_two()
        {
            return Err(bad(format!(
                "chunk size {} out of range",
                header.chunk_size
            )));
        }
        if header.volume_size == 0 || header.volume_size > MAX_VOLUME_SIZE {
            return Err(bad(format!(
                "volume size {} out of range",
                header.volume_size
            )));
        }
        if u64_at(h, 32) != header.entry_count() {
            return Err(bad(format!(
                "{} entries for a {}-byte volume of {}-byte chunks",
                u64_at(h, 32),
                header.volume_size,
                header.chunk_size
            )));
        }
        Ok(header)
    }
}

/// Writes an index in one pass: placeholder header, entries, then the real header.
pub struct IndexWriter<W: Write + Seek> {
    out: W,
    volume_size: u64,
    chunk_size: u32,
    written: u64,
    hasher: Hasher,
}

impl<W: Write + Seek> IndexWriter<W> {
    pub fn new(mut out: W, volume_size: u64, chunk_size: u32) -> std::io::Result<Self> {
        out.write_all(&[0u8; HEADER_LEN])?;
        Ok(IndexWriter {
            out,
            volume_size,
            chunk_size,
            written: 0,
            hasher: Hasher::default(),
        })
    }

    pub fn push(&mut self, digest: &Digest) -> std::io::Result<()> {
        self.out.write_all(&digest.0)?;
        self.hasher.update(&digest.0);
        self.written += 1;
        Ok(())
    }

    /// Writes the header and returns it with the writer. Panics if the number of entries
    /// pushed does not match the volume: that is a bug in the caller, not bad input.
    pub fn finish(mut self) -> std::io::Result<(IndexHeader, W)> {
        let header = IndexHeader {
            volume_size: self.volume_size,
            chunk_size: self.chunk_size,
            entries_digest: self.hasher.finish(),
        };
        assert_eq!(self.written, header.entry_count(), "index entry count");
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header.encode())?;
        self.out.flush()?;
        Ok((header, self.out))
    }
}

/// Encodes a whole index held in memory (tests, vectors, small volumes).
pub fn encode(volume_size: u64, chunk_size: u32, entries: &[Digest]) -> (IndexHeader, Vec<u8>) {
    let mut w = IndexWriter::new(std::io::Cursor::new(Vec::new()), volume_size, chunk_size)
        .expect("in-memory write");
    for e in entries {
        w.push(e).expect("in-memory write");
    }
    let (h, cur) = w.finish().expect("in-memory write");
    (h, cur.into_inner())
}

/// Reads entries in batches, checking the entries digest once the last one is read.
pub struct EntryReader<R: Read> {
    input: R,
    header: IndexHeader,
    next: u64,
    hasher: Hasher,
    buf: Vec<u8>,
}

impl<R: Read> EntryReader<R> {
    /// `input` is positioned just after the header.
    pub fn new(input: R, header: IndexHeader) -> Self {
        EntryReader {
            input,
            header,
            next: 0,
            hasher: Hasher::default(),
            buf: Vec::new(),
        }
    }

    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    /// Up to `max` further entries; an empty batch once all are read. The digest of all
    /// entries is checked when the last batch is read, so a caller that reads to the end
    /// has a verified index.
    pub fn next_batch(&mut self, max: usize, out: &mut Vec<Digest>) -> Result<()> {
        out.clear();
        let left = self.header.entry_count() - self.next;
        let n = left.min(max as u64) as usize;
        if n == 0 {
            return Ok(());
        }
        self.buf.resize(n * ENTRY_LEN, 0);
        self.input.read_exact(&mut self.buf).map_err(|e| {
            // Short is damage; anything else is the store failing to read (a remote
            // store's lost connection, a disk error), not a verdict on the index.
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FormatError::corrupt(
                    "volume index",
                    format!("entries end early at entry {}: {e}", self.next),
                )
            } else {
                FormatError::io(format!("reading volume index entry {}", self.next), e)
            }
        })?;
        self.hasher.update(&self.buf);
        out.extend(
            self.buf
                .chunks_exact(ENTRY_LEN)
                .map(|e| Digest(e.try_into().expect("32 bytes"))),
        );
        self.next += n as u64;
        if self.next == self.header.entry_count() {
            let got = std::mem::take(&mut self.hasher).finish();
            if got != self.header.entries_digest {
                return Err(FormatError::corrupt(
                    "volume index",
                    "entries do not match the digest in the header",
                ));
            }
            let mut extra = [0u8; 1];
            if matches!(self.input.read(&mut extra), Ok(n) if n > 0) {
                return Err(FormatError::corrupt(
                    "volume index",
                    "trailing bytes after the last entry",
                ));
            }
        }
        Ok(())
    }

    /// Reads all entries (for callers that know the index is small).
    pub fn read_all(mut self) -> Result<Vec<Digest>> {
        let mut all = Vec::new();
        let mut batch = Vec::new();
        loop {
            self.next_batch(65536, &mut batch)?;
            if batch.is_empty() {
                return Ok(all);
            }
            all.append(&mut batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_flips() {
        let entries: Vec<Digest> = (0..5u8)
            .map(|i| {
                if i == 2 {
                    Digest::HOLE
                } else {
                    Digest::of_bytes(&[i])
                }
            })
            .collect();
        let (h, bytes) = encode(4 * 65536 + 100, 65536, &entries);
        assert_eq!(bytes.len() as u64, h.object_len());
        assert_eq!(h.chunk_len(4), 100);
        let parsed = IndexHeader::parse(&bytes).unwrap();
        assert_eq!(parsed, h);
        let got = EntryReader::new(&bytes[HEADER_LEN..], parsed)
            .read_all()
            .unwrap();
        assert_eq!(got, entries);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            let ok = IndexHeader::parse(&bad).and_then(|h2| {
                if h2.id() != h.id() {
                    return Err(FormatError::corrupt("x", "id changed"));
                }
                EntryReader::new(&bad[HEADER_LEN..], h2).read_all()
            });
            assert!(ok.is_err(), "flip at {i} accepted");
        }
    }
}
