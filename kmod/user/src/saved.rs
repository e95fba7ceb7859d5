//! Saved tracker state: a tracker's table, generation and sequence written at a clean
//! shutdown (`bkimg cbt detach --save`) and restored at boot (`bkimg cbt restore`), so
//! change tracking survives a reboot. Layout: spec/kmod-uapi.md §8. Version 2 binds the
//! state to its device ([`Binding`]: identity and content fingerprint); version 1 files
//! (no binding) are still read, and restoring refuses them as untrusted.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::binding::{self, Binding, Region};
use crate::device::DevNum;
use crate::error::{KmodError, Result};
use crate::uapi::{MAX_BLOCKS, MAX_SEQUENCE};

/// First 8 bytes of SHA-256("bkimg saved tracker v1"). NEVER CHANGE: it is in every file
/// written, of every version.
pub const MAGIC: [u8; 8] = [0x34, 0xa4, 0x06, 0xf5, 0x8c, 0x38, 0xfd, 0x33];
pub const MAGIC_SOURCE: &str = "bkimg saved tracker v1";
/// The version written (with a binding).
pub const VERSION: u32 = 2;
/// The version without a binding: read, never trusted by a restore.
pub const VERSION_UNBOUND: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const TRAILER_LEN: usize = 32;
/// The longest valid file; a reader reads no more than this (plus one byte, to notice
/// a longer file) before allocating.
pub const MAX_FILE_LEN: u64 = HEADER_LEN as u64
    + binding::MAX_IDENTITY_LEN as u64
    + (binding::MAX_REGIONS * binding::REGION_RECORD) as u64
    + MAX_BLOCKS
    + TRAILER_LEN as u64;
const MAX_BLOCK_SIZE: u32 = 1 << 30;

/// A tracker's state saved when it was detached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedTracker {
    /// The device's number when saved (informational: numbers may change across boots).
    pub dev: DevNum,
    pub block_size: u32,
    pub device_sectors: u64,
    pub generation: [u8; 16],
    pub sequence: u64,
    /// One byte per block, each `<= sequence`.
    pub table: Vec<u8>,
    /// The device's identity and fingerprint when saved; None in a version 1 file (and
    /// such a state is written as version 1: restoring refuses it).
    pub binding: Option<Binding>,
}

/// Why bytes are not a saved state: damaged, or of a version this bkimg does not know.
#[derive(Debug)]
enum Bad {
    Damaged(String),
    Unsupported(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The identity and regions of a version 2 file (`bytes`: both, identity first).
fn decode_binding(bytes: &[u8], identity_len: usize, device_size: u64) -> Result<Binding, Bad> {
    let (identity, records) = bytes.split_at(identity_len);
    let identity = binding::parse_identity(identity).map_err(Bad::Damaged)?;
    let mut regions: Vec<Region> = Vec::new();
    for rec in records.chunks_exact(binding::REGION_RECORD) {
        let r = Region {
            offset: u64_at(rec, 0),
            len: u64_at(rec, 8),
            sha256: rec[16..48].try_into().expect("32 bytes"),
        };
        if r.len == 0
            || r.len > binding::MAX_REGION_LEN
            || r.offset
                .checked_add(r.len)
                .is_none_or(|end| end > device_size)
        {
            return Err(Bad::Damaged(format!(
                "fingerprint region of {} bytes at {} is not within the device",
                r.len, r.offset
            )));
        }
        if regions.last().is_some_and(|last| last.offset >= r.offset) {
            return Err(Bad::Damaged(
                "fingerprint regions are not in ascending order".into(),
            ));
        }
        regions.push(r);
    }
    Ok(Binding { identity, regions })
}

impl SavedTracker {
    pub fn generation_hex(&self) -> String {
        hex::encode(self.generation)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        let version = match self.binding {
            Some(_) => VERSION,
            None => VERSION_UNBOUND,
        };
        out[8..12].copy_from_slice(&version.to_le_bytes());
        out[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        out[24..32].copy_from_slice(&(self.device_sectors * 512).to_le_bytes());
        out[32..48].copy_from_slice(&self.generation);
        out[48..56].copy_from_slice(&self.sequence.to_le_bytes());
        out[56..64].copy_from_slice(&(self.table.len() as u64).to_le_bytes());
        out[64..68].copy_from_slice(&self.dev.major.to_le_bytes());
        out[68..72].copy_from_slice(&self.dev.minor.to_le_bytes());
        if let Some(b) = &self.binding {
            let identity = binding::identity_text(&b.identity);
            out[72..76].copy_from_slice(&(identity.len() as u32).to_le_bytes());
            out[76..80].copy_from_slice(&(b.regions.len() as u32).to_le_bytes());
            out.extend_from_slice(identity.as_bytes());
            for r in &b.regions {
                out.extend_from_slice(&r.offset.to_le_bytes());
                out.extend_from_slice(&r.len.to_le_bytes());
                out.extend_from_slice(&r.sha256);
            }
        }
        out.extend_from_slice(&self.table);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    fn decode_inner(bytes: &[u8]) -> Result<SavedTracker, Bad> {
        let bad = |d: String| Bad::Damaged(d);
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!(
                "{} bytes is too short (truncated?)",
                bytes.len()
            )));
        }
        if bytes[..8] != MAGIC {
            return Err(bad(
                "wrong magic number (not a bkimg saved tracker state)".into()
            ));
        }
        let version = u32_at(bytes, 8);
        if version != VERSION && version != VERSION_UNBOUND {
            return Err(Bad::Unsupported(format!("version {version}")));
        }
        let bound = version == VERSION;
        let flags = u32_at(bytes, 12);
        if flags != 0 {
            return Err(Bad::Unsupported(format!("unknown flags {flags:#x}")));
        }
        let blocks = u64_at(bytes, 56);
        if blocks > MAX_BLOCKS {
            return Err(bad(format!(
                "{blocks} blocks exceeds the limit {MAX_BLOCKS}"
            )));
        }
        let (identity_len, regions) = match bound {
            true => (u32_at(bytes, 72) as usize, u32_at(bytes, 76) as usize),
            false => (0, 0),
        };
        if identity_len > binding::MAX_IDENTITY_LEN {
            return Err(bad(format!(
                "an identity of {identity_len} bytes exceeds the limit {}",
                binding::MAX_IDENTITY_LEN
            )));
        }
        if bound && !(1..=binding::MAX_REGIONS).contains(&regions) {
            return Err(bad(format!(
                "{regions} fingerprint regions is not 1 to {}",
                binding::MAX_REGIONS
            )));
        }
        let binding_len = identity_len + regions * binding::REGION_RECORD;
        let expected = (HEADER_LEN + binding_len) as u64 + blocks + TRAILER_LEN as u64;
        if bytes.len() as u64 != expected {
            return Err(bad(format!(
                "{} bytes, but {blocks} blocks need {expected} (truncated?)",
                bytes.len()
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if Sha256::digest(body).as_slice() != trailer {
            return Err(bad("content does not match its SHA-256 digest".into()));
        }
        let reserved_from = if bound { 80 } else { 72 };
        if u32_at(bytes, 20) != 0 || bytes[reserved_from..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let block_size = u32_at(bytes, 16);
        if !(512..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(bad(format!("block size {block_size} is invalid")));
        }
        let device_size = u64_at(bytes, 24);
        if device_size == 0 || device_size & 511 != 0 {
            return Err(bad(format!(
                "device size {device_size} is not a positive multiple of 512"
            )));
        }
        if device_size.div_ceil(u64::from(block_size)) != blocks {
            return Err(bad(format!(
                "{blocks} blocks of {block_size} bytes do not cover a device of {device_size} bytes"
            )));
        }
        let generation: [u8; 16] = bytes[32..48].try_into().expect("16 bytes");
        if generation == [0; 16] {
            return Err(bad("the generation is all zero".into()));
        }
        let sequence = u64_at(bytes, 48);
        if sequence == 0 || sequence > MAX_SEQUENCE {
            return Err(bad(format!(
                "sequence {sequence} is not 1 to {MAX_SEQUENCE}"
            )));
        }
        let binding = match bound {
            true => Some(decode_binding(
                &body[HEADER_LEN..HEADER_LEN + binding_len],
                identity_len,
                device_size,
            )?),
            false => None,
        };
        let table = &body[HEADER_LEN + binding_len..];
        if let Some(i) = table.iter().position(|&b| u64::from(b) > sequence) {
            return Err(bad(format!(
                "block {i} holds sequence {}, past the saved sequence {sequence}",
                table[i]
            )));
        }
        Ok(SavedTracker {
            dev: DevNum::new(u32_at(bytes, 64), u32_at(bytes, 68)),
            block_size,
            device_sectors: device_size / 512,
            generation,
            sequence,
            table: table.to_vec(),
            binding,
        })
    }

    /// Decodes a saved state; `path` names it in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<SavedTracker> {
        SavedTracker::decode_inner(bytes).map_err(|b| match b {
            Bad::Damaged(detail) => KmodError::SavedDamaged {
                path: path.to_path_buf(),
                detail,
            },
            Bad::Unsupported(detail) => KmodError::SavedUnsupported {
                path: path.to_path_buf(),
                detail,
            },
        })
    }

    /// Reads and checks a saved state file (bounded before allocating).
    pub fn read_from(path: &Path) -> Result<SavedTracker> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes))
            .map_err(|e| {
                KmodError::io(
                    format!("cannot read saved tracker state {}", path.display()),
                    e,
                )
            })?;
        SavedTracker::decode(&bytes, path)
    }

    /// Writes the state crash-safely: a temporary file beside `path`, fsync, rename over
    /// `path`, fsync of the directory. A crash leaves the old file or the new one.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode()).map_err(|e| {
            KmodError::io(
                format!("cannot write saved tracker state {}", path.display()),
                e,
            )
        })
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then fsyncs the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?
        .to_string_lossy();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes a file and makes the removal durable (fsync of its directory).
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn sample() -> SavedTracker {
        // 10 MiB + 512 bytes in 64 KiB blocks: 161 blocks, the last one partial.
        let device_sectors: u64 = (10 << 20) / 512 + 1;
        let blocks = (device_sectors * 512).div_ceil(65536) as usize;
        let mut table = vec![0u8; blocks];
        table[0] = 3;
        table[7] = 1;
        table[blocks - 1] = 4;
        SavedTracker {
            dev: DevNum::new(253, 16),
            block_size: 65536,
            device_sectors,
            generation: *b"0123456789abcdef",
            sequence: 4,
            table,
            binding: Some(Binding {
                identity: vec![
                    ("serial".into(), "vm-disk-b".into()),
                    ("wwid".into(), "t10.QEMU".into()),
                ],
                regions: vec![
                    Region {
                        offset: 0,
                        len: 1 << 20,
                        sha256: [0xaa; 32],
                    },
                    Region {
                        offset: 9 << 20,
                        len: (1 << 20) + 512,
                        sha256: [0xbb; 32],
                    },
                ],
            }),
        }
    }

    /// As an older bkimg wrote it: version 1, no binding.
    fn sample_v1() -> SavedTracker {
        SavedTracker {
            binding: None,
            ..sample()
        }
    }

    #[test]
    fn magic_is_derived_from_its_string() {
        assert_eq!(&Sha256::digest(MAGIC_SOURCE.as_bytes())[..8], &MAGIC[..]);
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vdb.cbt");
        let s = sample();
        s.write_to(&path).unwrap();
        assert_eq!(SavedTracker::read_from(&path).unwrap(), s);
        // Overwriting replaces it whole; no temporary file is left.
        let mut t = s.clone();
        t.sequence = 5;
        t.write_to(&path).unwrap();
        assert_eq!(SavedTracker::read_from(&path).unwrap(), t);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        remove_durably(&path).unwrap();
        let e = SavedTracker::read_from(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn layout_is_as_specified() {
        let s = sample();
        let b = s.encode();
        let identity = b"serial=vm-disk-b\nwwid=t10.QEMU\n";
        let table_at = HEADER_LEN + identity.len() + 2 * 48;
        assert_eq!(b.len(), table_at + s.table.len() + TRAILER_LEN);
        assert_eq!(&b[..8], &[0x34, 0xa4, 0x06, 0xf5, 0x8c, 0x38, 0xfd, 0x33]);
        assert_eq!(u32_at(&b, 8), 2);
        assert_eq!(u32_at(&b, 16), 65536);
        assert_eq!(u64_at(&b, 24), (10 << 20) + 512);
        assert_eq!(&b[32..48], b"0123456789abcdef");
        assert_eq!(u64_at(&b, 48), 4);
        assert_eq!(u64_at(&b, 56), 161);
        assert_eq!((u32_at(&b, 64), u32_at(&b, 68)), (253, 16));
        assert_eq!(u32_at(&b, 72) as usize, identity.len());
        assert_eq!(u32_at(&b, 76), 2);
        assert!(b[80..HEADER_LEN].iter().all(|&x| x == 0));
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + identity.len()], identity);
        let r1 = HEADER_LEN + identity.len() + 48;
        assert_eq!(u64_at(&b, r1), 9 << 20);
        assert_eq!(u64_at(&b, r1 + 8), (1 << 20) + 512);
        assert_eq!(&b[r1 + 16..r1 + 48], &[0xbb; 32]);
        assert_eq!(&b[table_at..table_at + 161], &s.table[..]);
        assert_eq!(
            &b[b.len() - 32..],
            Sha256::digest(&b[..b.len() - 32]).as_slice()
        );
    }

    /// Version 1 files (before the binding) are still read, without a binding.
    #[test]
    fn version_1_is_read_unbound() {
        let s = sample_v1();
        let b = s.encode();
        assert_eq!(b.len(), HEADER_LEN + s.table.len() + TRAILER_LEN);
        assert_eq!(u32_at(&b, 8), 1);
        assert!(b[72..HEADER_LEN].iter().all(|&x| x == 0));
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + 161], &s.table[..]);
        let back = SavedTracker::decode(&b, Path::new("x.cbt")).unwrap();
        assert_eq!(back, s);
        assert!(back.binding.is_none());
    }

    #[test]
    fn every_flipped_bit_and_truncation_is_rejected() {
        let p = Path::new("x.cbt");
        for bytes in [sample().encode(), sample_v1().encode()] {
            for i in 0..bytes.len() {
                for bit in [0x01, 0x80] {
                    let mut bad = bytes.clone();
                    bad[i] ^= bit;
                    let e = SavedTracker::decode(&bad, p).unwrap_err();
                    assert!(
                        matches!(e.kind(), ErrorKind::Damaged | ErrorKind::Unsupported),
                        "flip at {i}: {e}"
                    );
                }
            }
            for len in [0, 1, 100, HEADER_LEN, HEADER_LEN + 31, bytes.len() - 1] {
                let e = SavedTracker::decode(&bytes[..len], p).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Damaged, "length {len}: {e}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                SavedTracker::decode(&longer, p).unwrap_err().kind(),
                ErrorKind::Damaged
            );
        }
    }

    /// Re-sealed files (valid digest) with bad fields: each rule of §8 on its own.
    #[test]
    fn semantic_rules_are_checked() {
        let p = Path::new("x.cbt");
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - TRAILER_LEN;
            let d = Sha256::digest(&b[..n]);
            b[n..].copy_from_slice(&d);
            b
        };
        let base = sample().encode();
        // (rule, offset, bytes written there, expected error)
        let cases: Vec<(&str, usize, Vec<u8>, ErrorKind)> = vec![
            ("version", 8, vec![3], ErrorKind::Unsupported),
            ("flags", 12, vec![1], ErrorKind::Unsupported),
            ("reserved", 100, vec![1], ErrorKind::Damaged),
            ("reserved at 20", 20, vec![1], ErrorKind::Damaged),
            (
                "block size",
                16,
                65535u32.to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "block size 256",
                16,
                256u32.to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "device size",
                24,
                (20u64 << 20).to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "odd device size",
                24,
                (10u64 << 20 | 513).to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            ("generation", 32, vec![0; 16], ErrorKind::Damaged),
            ("sequence 0", 48, vec![0; 8], ErrorKind::Damaged),
            (
                "sequence 256",
                48,
                256u64.to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "table byte",
                HEADER_LEN + 31 + 96 + 3,
                vec![5],
                ErrorKind::Damaged,
            ),
            (
                "identity key",
                HEADER_LEN,
                b"S".to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "identity order",
                HEADER_LEN,
                b"x".to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "identity value",
                HEADER_LEN + 7,
                b"\x01".to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "region past the end",
                HEADER_LEN + 31 + 48,
                (10u64 << 20).to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "region order",
                HEADER_LEN + 31 + 48,
                0u64.to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "empty region",
                HEADER_LEN + 31 + 8,
                0u64.to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
            (
                "huge region",
                HEADER_LEN + 31 + 8,
                (17u64 << 20).to_le_bytes().to_vec(),
                ErrorKind::Damaged,
            ),
        ];
        for (what, at, bytes, kind) in cases {
            let mut b = base.clone();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let e = SavedTracker::decode(&reseal(b), p).unwrap_err();
            assert_eq!(e.kind(), kind, "{what}: {e}");
        }
        // Counts that do not fit the length, or exceed their limits.
        for (at, value, what) in [
            (72, 4097u32, "exceeds the limit"),
            (76, 0, "is not 1 to 1024"),
            (76, 1025, "is not 1 to 1024"),
            (76, 3, "truncated"),
        ] {
            let mut b = base.clone();
            b[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let e = SavedTracker::decode(&reseal(b), p).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
            assert!(e.to_string().contains(what), "{at}={value}: {e}");
        }
        // A huge block count is refused before anything is allocated for it.
        let mut b = base.clone();
        b[56..64].copy_from_slice(&(MAX_BLOCKS + 1).to_le_bytes());
        let e = SavedTracker::decode(&b, p).unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }
}
