//! Change maps: which blocks of a device changed since a tracked point. Produced by the
//! kernel module's change tracking (or any other tracker) and read by `capture
//! --changed-blocks`.
//!
//! 128-byte header, `range_count` 16-byte ranges (first block, block count; ascending,
//! non-overlapping, within the device), then the SHA-256 of everything before it.

use crate::chunk::{u32_at, u64_at};
use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::magic;

pub const HEADER_LEN: usize = 128;
pub const VERSION: u32 = 1;
/// Bounds the allocation of ranges before reading them.
pub const MAX_RANGES: u64 = 1 << 28;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeMap {
    /// Tracking block size in bytes (a power of two, at least 512).
    pub block_size: u32,
    pub device_size: u64,
    /// Identifies one continuous run of tracking; changes whenever the tracker lost state.
    pub generation: [u8; 16],
    /// Changes are those after snapshot `from_sequence` up to and including `to_sequence`.
    pub from_sequence: u64,
    pub to_sequence: u64,
    /// (first block, number of blocks).
    pub ranges: Vec<(u64, u64)>,
}

impl ChangeMap {
    pub fn generation_hex(&self) -> String {
        hex::encode(self.generation)
    }

    /// Changed byte ranges, clipped to the device.
    pub fn byte_ranges(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let bs = u64::from(self.block_size);
        // A valid range starts inside the device, so `first * bs` fits; its end need not
        // (the last block of a device within a block of 2^64 bytes): clip, never wrap.
        self.ranges.iter().map(move |&(first, count)| {
            first * bs..(first + count).saturating_mul(bs).min(self.device_size)
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..8].copy_from_slice(&magic::CHANGE_MAP);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.device_size.to_le_bytes());
        out[32..48].copy_from_slice(&self.generation);
        out[48..56].copy_from_slice(&self.from_sequence.to_le_bytes());
        out[56..64].copy_from_slice(&self.to_sequence.to_le_bytes());
        out[64..72].copy_from_slice(&(self.ranges.len() as u64).to_le_bytes());
        for &(first, count) in &self.ranges {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        let digest = Digest::of_bytes(&out);
        out.extend_from_slice(&digest.0);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ChangeMap> {
        let bad = |d: String| FormatError::corrupt("change map", d);
        if bytes.len() < HEADER_LEN + 32 {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        if bytes[..8] != magic::CHANGE_MAP {
            return Err(bad("wrong magic number (not a bkimg change map)".into()));
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(FormatError::unsupported(
                "change map",
                format!("change map version {version}"),
            ));
        }
        if u32_at(bytes, 12) != 0 {
            return Err(FormatError::unsupported(
                "change map",
                format!("unknown flags {:#x}", u32_at(bytes, 12)),
            ));
        }
        let count = u64_at(bytes, 64);
        if count > MAX_RANGES {
            return Err(bad(format!(
                "{count} ranges exceeds the limit {MAX_RANGES}"
            )));
        }
        let expected_len = HEADER_LEN as u64 + count * 16 + 32;
        if bytes.len() as u64 != expected_len {
            return Err(bad(format!(
                "{} bytes, {count} ranges need {expected_len} (truncated?)",
                bytes.len()
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 32);
        if Digest::of_bytes(body).0 != trailer {
            return Err(bad("content does not match its SHA-256 digest".into()));
        }
        if u32_at(bytes, 20) != 0 || bytes[72..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let map = ChangeMap {
            block_size: u32_at(bytes, 16),
            device_size: u64_at(bytes, 24),
            generation: bytes[32..48].try_into().expect("16 bytes"),
            from_sequence: u64_at(bytes, 48),
            to_sequence: u64_at(bytes, 56),
            ranges: body[HEADER_LEN..]
                .chunks_exact(16)
                .map(|r| (u64_at(r, 0), u64_at(r, 8)))
                .collect(),
        };
        map.validate()?;
        Ok(map)
    }

    /// Checks block size, ordering and bounds of the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| FormatError::corrupt("change map", d);
        if self.block_size < 512 || !self.block_size.is_power_of_two() {
            return Err(bad(format!("block size {} is invalid", self.block_size)));
        }
        if self.from_sequence > self.to_sequence {
            return Err(bad("sequence range runs backwards".into()));
        }
        let blocks = self.device_size.div_ceil(u64::from(self.block_size));
        let mut prev_end = 0u64;
        for (i, &(first, count)) in self.ranges.iter().enumerate() {
            let end = first.checked_add(count);
            if count == 0 || first < prev_end || end.is_none_or(|e| e > blocks) {
                return Err(bad(format!(
                    "range {i} ({first}+{count}) is empty, out of order or beyond the device"
                )));
            }
            prev_end = end.expect("checked");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_damage() {
        let map = ChangeMap {
            block_size: 65536,
            device_size: 10 << 20,
            generation: [7; 16],
            from_sequence: 3,
            to_sequence: 4,
            ranges: vec![(0, 2), (10, 5), (159, 1)],
        };
        let bytes = map.encode();
        assert_eq!(ChangeMap::decode(&bytes).unwrap(), map);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(ChangeMap::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(ChangeMap::decode(&bytes[..bytes.len() - 16]).is_err());
        let overlapping = ChangeMap {
            ranges: vec![(0, 5), (4, 1)],
            ..map
        };
        assert!(ChangeMap::decode(&overlapping.encode()).is_err());
    }

    #[test]
    fn byte_ranges_of_a_device_near_2_pow_64_are_clipped_not_wrapped() {
        // Found by the changemap fuzz target's harness: the last block's end overflowed.
        let map = ChangeMap {
            block_size: 512,
            device_size: u64::MAX,
            generation: [1; 16],
            from_sequence: 0,
            to_sequence: 1,
            ranges: vec![((1 << 55) - 1, 1)],
        };
        let map = ChangeMap::decode(&map.encode()).unwrap();
        let ranges: Vec<_> = map.byte_ranges().collect();
        assert_eq!(ranges, vec![u64::MAX - 511..u64::MAX]);
    }
}
