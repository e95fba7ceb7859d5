//! Chunk blobs: a 64-byte header and the (possibly zstd-compressed) plaintext.

use std::cell::RefCell;

use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::protect::ChunkIds;
use crate::{magic, MAX_CHUNK_SIZE};

pub const HEADER_LEN: usize = 64;

/// How a blob's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// Parsed chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub compression: Compression,
    pub plain_len: u32,
    pub stored_len: u32,
    pub digest: Digest,
}

impl ChunkHeader {
    pub fn parse(bytes: &[u8]) -> Result<ChunkHeader> {
        let bad = |detail: String| FormatError::corrupt("chunk header", detail);
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, need {HEADER_LEN}", bytes.len())));
        }
        if bytes[..8] != magic::CHUNK {
            return Err(bad("wrong magic number".into()));
        }
        let compression = match bytes[8] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => {
                return Err(FormatError::unsupported(
                    "chunk",
                    format!("compression method {other}"),
                ))
            }
        };
        if bytes[9..12] != [0; 3] || bytes[20..24] != [0; 4] || bytes[56..64] != [0; 8] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let plain_len = u32_at(bytes, 12);
        let stored_len = u32_at(bytes, 16);
        if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
            return Err(bad(format!("plaintext length {plain_len} out of range")));
        }
        if stored_len > plain_len || (compression == Compression::None && stored_len != plain_len) {
            return Err(bad(format!(
                "stored length {stored_len} does not fit plaintext length {plain_len}"
            )));
        }
        let digest = Digest(bytes[24..56].try_into().expect("32 bytes"));
        Ok(ChunkHeader {
            compression,
            plain_len,
            stored_len,
            digest,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&magic::CHUNK);
        h[8] = self.compression as u8;
        h[12..16].copy_from_slice(&self.plain_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        h[24..56].copy_from_slice(&self.digest.0);
        h
    }

    /// Total blob length: header plus payload.
    pub fn blob_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

thread_local! {
    /// zstd contexts are costly to set up (hundreds of KiB); each thread keeps its own.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Encodes a chunk: compresses with zstd at `level` (0 = store uncompressed) and keeps the
/// compressed form only when it is smaller. `digest` must be `Digest::of_chunk(plain)`.
pub fn encode(plain: &[u8], digest: Digest, level: i32) -> Result<Vec<u8>> {
    let mut blob = Vec::new();
    encode_into(plain, digest, level, &mut blob)?;
    Ok(blob)
}

/// [`encode`] into a reused buffer (cleared first).
pub fn encode_into(plain: &[u8], digest: Digest, level: i32, blob: &mut Vec<u8>) -> Result<()> {
    assert!(!plain.is_empty() && plain.len() <= MAX_CHUNK_SIZE as usize);
    blob.clear();
    blob.resize(HEADER_LEN, 0);
    let mut compression = Compression::None;
    if level != 0 {
        // Compress straight after the header; fall back to plain bytes if it did not help.
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        blob.resize(HEADER_LEN + bound, 0);
        let n = COMPRESSOR
            .with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    *slot = Some((level, zstd::bulk::Compressor::new(level)?));
                }
                let (_, c) = slot.as_mut().expect("just set");
                c.compress_to_buffer(plain, &mut blob[HEADER_LEN..])
            })
            .map_err(|e| FormatError::io("compressing a chunk", e))?;
        if n < plain.len() {
            blob.truncate(HEADER_LEN + n);
            compression = Compression::Zstd;
        } else {
            blob.truncate(HEADER_LEN);
        }
    }
    if compression == Compression::None {
        blob.extend_from_slice(plain);
    }
    let header = ChunkHeader {
        compression,
        plain_len: plain.len() as u32,
        stored_len: (blob.len() - HEADER_LEN) as u32,
        digest,
    };
    blob[..HEADER_LEN].copy_from_slice(&header.encode());
    Ok(())
}

/// Decodes a blob into `out` (cleared first) and checks the plaintext against both the
/// digest in the header and `expected`, the digest it was looked up by.
pub fn decode_into(
    blob: &[u8],
    expected: &Digest,
    ids: &ChunkIds,
    out: &mut Vec<u8>,
) -> Result<()> {
    let len = plain_len(blob, expected)?;
    out.clear();
    out.resize(len, 0);
    decode_to(blob, expected, ids, out)
}

/// The plain length a chunk blob declares, after checking its header against `expected`
/// (so it is bounded by the largest chunk size before anyone allocates it).
pub fn plain_len(blob: &[u8], expected: &Digest) -> Result<usize> {
    Ok(checked_header(blob, expected)?.plain_len as usize)
}

/// Decodes a chunk blob into `out`, which must be exactly [`plain_len`] bytes, and checks
/// the result against `expected`, computed as `ids` says.
pub fn decode_to(blob: &[u8], expected: &Digest, ids: &ChunkIds, out: &mut [u8]) -> Result<()> {
    let what = || format!("chunk {expected}");
    let header = checked_header(blob, expected)?;
    if out.len() != header.plain_len as usize {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "{} bytes where the header says {}",
                out.len(),
                header.plain_len
            ),
        ));
    }
    let payload = &blob[HEADER_LEN..];
    match header.compression {
        Compression::None => {
            if payload.len() != out.len() {
                return Err(FormatError::corrupt(
                    what(),
                    format!(
                        "stored payload is {} bytes, header says {}",
                        payload.len(),
                        header.plain_len
                    ),
                ));
            }
            out.copy_from_slice(payload)
        }
        Compression::Zstd => {
            let n = DECOMPRESSOR
                .with(|cell| {
                    let mut slot = cell.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(zstd::bulk::Decompressor::new()?);
                    }
                    let d = slot.as_mut().expect("just set");
                    d.decompress_to_buffer(payload, &mut *out)
                })
                .map_err(|e| FormatError::corrupt(what(), format!("zstd: {e}")))?;
            if n != header.plain_len as usize {
                return Err(FormatError::corrupt(
                    what(),
                    format!(
                        "decompressed to {n} bytes, header says {}",
                        header.plain_len
                    ),
                ));
            }
        }
    }
    if ids.of_stored(out) != *expected {
        return Err(FormatError::corrupt(
            what(),
            format!("content does not match its {}", ids.name()),
        ));
    }
    Ok(())
}

fn checked_header(blob: &[u8], expected: &Digest) -> Result<ChunkHeader> {
    let what = || format!("chunk {expected}");
    let header = ChunkHeader::parse(blob).map_err(|e| rename(e, &what()))?;
    if blob.len() as u64 != header.blob_len() {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "blob is {} bytes, header says {}",
                blob.len(),
                header.blob_len()
            ),
        ));
    }
    if header.digest != *expected {
        return Err(FormatError::corrupt(
            what(),
            format!("header names digest {}", header.digest),
        ));
    }
    Ok(header)
}

fn rename(e: FormatError, what: &str) -> FormatError {
    match e {
        FormatError::Corrupt { detail, .. } => FormatError::corrupt(what, detail),
        FormatError::Unsupported { detail, .. } => FormatError::unsupported(what, detail),
        other => other,
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(plain: &[u8], level: i32) -> Vec<u8> {
        let d = Digest::of_chunk(plain);
        let blob = encode(plain, d, level).unwrap();
        let mut out = Vec::new();
        decode_into(&blob, &d, &ChunkIds::Sha256, &mut out).unwrap();
        assert_eq!(out, plain);
        blob
    }

    #[test]
    fn compressible_data_is_compressed_and_random_is_not() {
        let text = b"hello bkimg ".repeat(1000);
        let blob = round_trip(&text, 3);
        assert_eq!(blob[8], Compression::Zstd as u8);
        assert!(blob.len() < text.len() / 10);

        let mut x = 0x1234_5678_u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let blob = round_trip(&noise, 3);
        assert_eq!(blob[8], Compression::None as u8);
        round_trip(&text, 0);
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let text = b"some chunk content, repeated. ".repeat(50);
        let d = Digest::of_chunk(&text);
        let blob = encode(&text, d, 3).unwrap();
        let mut out = Vec::new();
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_into(&bad, &d, &ChunkIds::Sha256, &mut out).is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(decode_into(&blob[..blob.len() - 1], &d, &ChunkIds::Sha256, &mut out).is_err());
    }
}
