//! Chunk identity: SHA-256 of the plaintext. The one place digests are computed.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest. The all-zero value is reserved: in an index it marks a chunk whose
/// content is all zeros (or unused by the filesystem) and which has no stored data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The reserved "no data, reads as zeros" value.
    pub const HOLE: Digest = Digest([0; 32]);

    /// Digest of a chunk's plaintext, or [`Digest::HOLE`] when the chunk is all zeros.
    pub fn of_chunk(plain: &[u8]) -> Digest {
        if is_zero(plain) {
            Digest::HOLE
        } else {
            Digest::of_bytes(plain)
        }
    }

    /// Plain SHA-256 of any bytes (manifests, indexes, directories).
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn is_hole(&self) -> bool {
        *self == Digest::HOLE
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 lower-case hex digits (the only spelling the format allows).
    pub fn from_hex(text: &str) -> Option<Digest> {
        if text.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Incremental SHA-256 for objects written in pieces.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// True when every byte is zero. Word-at-a-time; the compiler vectorises the loop.
pub fn is_zero(buf: &[u8]) -> bool {
    let (words, tail) = buf.split_at(buf.len() / 8 * 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Decodes exactly `out.len()` bytes of hex.
pub fn decode_hex_into(text: &str, out: &mut [u8]) -> Result<(), hex::FromHexError> {
    hex::decode_to_slice(text, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_holes_and_others_are_sha256() {
        assert!(Digest::of_chunk(&[0u8; 4096]).is_hole());
        let d = Digest::of_chunk(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
