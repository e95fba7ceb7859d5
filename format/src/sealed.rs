//! Sealed documents: a 64-byte binary header (magic, version, feature flags, length and
//! SHA-256 of the body) followed by a UTF-8 JSON body. Manifests and the repository
//! config use this framing; the header lets a reader refuse damage or unknown features
//! before parsing any JSON.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::chunk::{u32_at, u64_at};
use crate::digest::Digest;
use crate::error::{FormatError, Result};

pub const HEADER_LEN: usize = 64;
/// Largest body a reader accepts (bounds the allocation).
pub const MAX_BODY_LEN: u64 = 16 << 20;

/// What a sealed document is, for messages and checks.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub name: &'static str,
    pub magic: [u8; 8],
    pub version: u32,
    /// Feature bits this build understands. An unknown incompatible bit is refused; an
    /// unknown compatible bit is ignored.
    pub known_incompat: u32,
}

/// Header fields besides the body digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub incompat: u32,
    pub compat: u32,
}

pub fn seal<T: Serialize>(kind: &Kind, features: Features, body: &T) -> Vec<u8> {
    let json = serde_json::to_vec_pretty(body).expect("manifest types always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + json.len() + 1);
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&features.incompat.to_le_bytes());
    out.extend_from_slice(&features.compat.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(json.len() as u64 + 1).to_le_bytes());
    let mut body = json;
    body.push(b'\n');
    out.extend_from_slice(&Digest::of_bytes(&body).0);
    out.extend_from_slice(&body);
    out
}

/// Checks the frame and parses the body. `bytes` must be exactly one document.
pub fn open<T: DeserializeOwned>(kind: &Kind, bytes: &[u8]) -> Result<(T, Features)> {
    let bad = |d: String| FormatError::corrupt(kind.name, d);
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, shorter than its {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..8] != kind.magic {
        return Err(bad(
            "wrong magic number (not a bkimg file of this kind)".into()
        ));
    }
    let version = u32_at(bytes, 8);
    if version != kind.version {
        return Err(FormatError::unsupported(
            kind.name,
            format!(
                "format version {version} (this bkimg reads {})",
                kind.version
            ),
        ));
    }
    let features = Features {
        incompat: u32_at(bytes, 12),
        compat: u32_at(bytes, 16),
    };
    let unknown = features.incompat & !kind.known_incompat;
    if unknown != 0 {
        return Err(FormatError::unsupported(
            kind.name,
            format!("unknown incompatible feature bits {unknown:#x}"),
        ));
    }
    if bytes[20..24] != [0; 4] {
        return Err(bad("reserved bytes are not zero".into()));
    }
    let len = u64_at(bytes, 24);
    if len > MAX_BODY_LEN {
        return Err(bad(format!("body length {len} exceeds {MAX_BODY_LEN}")));
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(bad(format!(
            "body is {} bytes, header says {len} (truncated?)",
            body.len()
        )));
    }
    if Digest::of_bytes(body).0 != bytes[32..64] {
        return Err(bad("body does not match its SHA-256 digest".into()));
    }
    let value = serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))?;
    Ok((value, features))
}
