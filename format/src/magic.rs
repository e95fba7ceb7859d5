//! Magic numbers. NEVER CHANGE THESE: they are in every file bkimg ever wrote.
//!
//! Each is the first 8 bytes of SHA-256 of a versioned ASCII string (listed in
//! spec/format.md), so they are unlikely to collide with anything else on a disk.

pub const CHUNK: [u8; 8] = [0x8a, 0xec, 0x83, 0x79, 0x83, 0xce, 0x77, 0xdc]; // "bkimg chunk v1"
pub const INDEX: [u8; 8] = [0x04, 0x25, 0x3d, 0x11, 0xbb, 0x79, 0x48, 0x36]; // "bkimg index v1"
pub const MANIFEST: [u8; 8] = [0xe6, 0x97, 0xf4, 0xa0, 0xb6, 0x4a, 0xd3, 0x77]; // "bkimg manifest v1"
pub const REPO_CONFIG: [u8; 8] = [0x02, 0xba, 0x26, 0xe4, 0xce, 0x30, 0xf1, 0xf4]; // "bkimg repository v1"
pub const CHANGE_MAP: [u8; 8] = [0x67, 0xb2, 0x98, 0x14, 0xa5, 0x44, 0x38, 0xfe]; // "bkimg change map v1"
pub const EXPORT_HEAD: [u8; 8] = [0x2e, 0xf4, 0xdb, 0xb0, 0x8c, 0xd4, 0x96, 0x05]; // "bkimg export v1"
pub const EXPORT_TAIL: [u8; 8] = [0xec, 0xd5, 0x21, 0x50, 0x77, 0x25, 0xe6, 0x58]; // "bkimg export trailer v1"
pub const PRUNE_RECORD: [u8; 8] = [0xc8, 0x46, 0x91, 0x3c, 0x96, 0x30, 0xd5, 0x59]; // "bkimg prune record v1"
pub const ENVELOPE: [u8; 8] = [0x83, 0xd0, 0xc4, 0xaa, 0x9c, 0x51, 0x4e, 0x7c]; // "bkimg envelope v1"
pub const KEY_SLOT: [u8; 8] = [0x61, 0x39, 0x8e, 0xa2, 0x82, 0x96, 0x38, 0x72]; // "bkimg key slot v1"
pub const ENVELOPE_STREAM: [u8; 8] = [0x6f, 0x53, 0x4f, 0xaf, 0xa8, 0xef, 0xc6, 0x8f]; // "bkimg envelope stream v1"
pub const MAC_ENVELOPE: [u8; 8] = [0x71, 0x5a, 0x1a, 0x84, 0x3f, 0x46, 0x5d, 0xe9]; // "bkimg mac envelope v1"

/// The strings each magic number is derived from, in the order of the constants above.
pub const SOURCES: [(&str, [u8; 8]); 12] = [
    ("bkimg chunk v1", CHUNK),
    ("bkimg index v1", INDEX),
    ("bkimg manifest v1", MANIFEST),
    ("bkimg repository v1", REPO_CONFIG),
    ("bkimg change map v1", CHANGE_MAP),
    ("bkimg export v1", EXPORT_HEAD),
    ("bkimg export trailer v1", EXPORT_TAIL),
    ("bkimg prune record v1", PRUNE_RECORD),
    ("bkimg envelope v1", ENVELOPE),
    ("bkimg key slot v1", KEY_SLOT),
    ("bkimg envelope stream v1", ENVELOPE_STREAM),
    ("bkimg mac envelope v1", MAC_ENVELOPE),
];

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    #[test]
    fn magics_are_derived_from_their_strings() {
        for (text, magic) in super::SOURCES {
            let hash = Sha256::digest(text.as_bytes());
            assert_eq!(
                &hash[..8],
                &magic[..],
                "magic for {text:?}: {:02x?}",
                &hash[..8]
            );
        }
    }
}
