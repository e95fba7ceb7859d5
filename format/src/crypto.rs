//! Keys derived from a repository's master key, keyed chunk ids, the AEAD object envelope
//! and object MACs (spec/format.md §18). Pure: no I/O besides the operating system's
//! random numbers for fresh keys and nonces.
//!
//! Every secret lives in a [`Key`], which is wiped when dropped.

use aes_gcm::Aes256Gcm;
use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::magic;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Magic, algorithm, kind, two reserved bytes, nonce.
pub const ENVELOPE_HEADER_LEN: usize = 24;
/// What sealing adds to a plaintext.
pub const ENVELOPE_OVERHEAD: usize = ENVELOPE_HEADER_LEN + TAG_LEN;
const _: () = assert!(ENVELOPE_HEADER_LEN == 8 + 1 + 1 + 2 + NONCE_LEN);

/// HKDF `info` labels. NEVER CHANGE THESE: every key of every encrypted repository
/// depends on them (spec/format.md §18.2).
pub const INFO_CHUNK_ID: &[u8] = b"bkimg chunk id key v1";
pub const INFO_DATA: &[u8] = b"bkimg data key v1";
pub const INFO_MAC: &[u8] = b"bkimg mac key v1";
pub const INFO_OBJECT: &[u8] = b"bkimg object key v1";
pub const MAC_LABEL: &[u8] = b"bkimg object mac v1";
pub const KEY_CHECK_LABEL: &[u8] = b"bkimg key check v1";

type HmacSha256 = Hmac<Sha256>;

/// 32 bytes of key material, wiped on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// A fresh key from the operating system's random number generator.
    pub fn random() -> Key {
        let mut k = Key([0; KEY_LEN]);
        fill_random(&mut k.0);
        k
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

pub fn fill_random(out: &mut [u8]) {
    getrandom::getrandom(out).expect("the operating system's random number generator failed");
}

/// HKDF-SHA256 (RFC 5869) to one 32-byte key.
pub fn hkdf(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Key {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = Key([0; KEY_LEN]);
    hk.expand_multi_info(info, &mut out.0)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

fn hmac(key: &Key, parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(&key.0).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// AEAD algorithms of the envelope; the byte is recorded in every sealed object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aead {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Aead {
    pub fn byte(self) -> u8 {
        match self {
            Aead::Aes256Gcm => 1,
            Aead::ChaCha20Poly1305 => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<Aead> {
        match b {
            1 => Some(Aead::Aes256Gcm),
            2 => Some(Aead::ChaCha20Poly1305),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Aead::Aes256Gcm => "aes-256-gcm",
            Aead::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// What a writer uses on this CPU: AES-256-GCM with AES and carry-less multiply
    /// instructions (x86 AES-NI + PCLMULQDQ, Armv8 AES + PMULL), else ChaCha20-Poly1305
    /// (constant time and fast in software). Measured in spec/format.md §18.3.
    pub fn preferred() -> Aead {
        if aes_hardware() {
            Aead::Aes256Gcm
        } else {
            Aead::ChaCha20Poly1305
        }
    }

    pub(crate) fn seal(
        self,
        key: &Key,
        nonce: &[u8; NONCE_LEN],
        msg: &[u8],
        aad: &[u8],
    ) -> Vec<u8> {
        let payload = Payload { msg, aad };
        match self {
            Aead::Aes256Gcm => Aes256Gcm::new((&key.0).into())
                .encrypt(nonce.into(), payload)
                .expect("AES-GCM seals any object bkimg writes"),
            Aead::ChaCha20Poly1305 => ChaCha20Poly1305::new((&key.0).into())
                .encrypt(nonce.into(), payload)
                .expect("ChaCha20-Poly1305 seals any object bkimg writes"),
        }
    }

    pub(crate) fn open(
        self,
        key: &Key,
        nonce: &[u8; NONCE_LEN],
        ct: &[u8],
        aad: &[u8],
    ) -> Option<Vec<u8>> {
        let payload = Payload { msg: ct, aad };
        match self {
            Aead::Aes256Gcm => Aes256Gcm::new((&key.0).into())
                .decrypt(nonce.into(), payload)
                .ok(),
            Aead::ChaCha20Poly1305 => ChaCha20Poly1305::new((&key.0).into())
                .decrypt(nonce.into(), payload)
                .ok(),
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn aes_hardware() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn aes_hardware() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn aes_hardware() -> bool {
    false
}

/// Checks the form of one envelope stored as `kind` named `name` (spec/format.md §18.4,
/// opening steps 1 and 2) and returns its algorithm: what can be checked without the key.
/// Only opening it ([`RepoKeys::open`]) authenticates it.
pub fn check_envelope(kind: ObjectKind, name: &str, sealed: &[u8]) -> Result<Aead> {
    let what = || format!("{} {name}", kind.describe());
    if sealed.len() < ENVELOPE_OVERHEAD {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "{} bytes, shorter than an encrypted object's {ENVELOPE_OVERHEAD}-byte envelope (truncated?)",
                sealed.len()
            ),
        ));
    }
    if sealed[..8] != magic::ENVELOPE {
        return Err(FormatError::corrupt(
            what(),
            "not an encrypted bkimg object (wrong magic number)",
        ));
    }
    let Some(aead) = Aead::from_byte(sealed[8]) else {
        return Err(FormatError::unsupported(
            what(),
            format!("encryption algorithm {}", sealed[8]),
        ));
    };
    if sealed[9] != kind.byte() {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "it is sealed as object kind {}, not as a {} (swapped?)",
                sealed[9],
                kind.describe()
            ),
        ));
    }
    if sealed[10..12] != [0, 0] {
        return Err(FormatError::corrupt(
            what(),
            "reserved envelope bytes are not zero",
        ));
    }
    Ok(aead)
}

/// Whether `bytes` start like an envelope of `kind`: a cheap check that an object is
/// present and whole enough to try; only opening it authenticates it.
pub fn is_envelope_of(bytes: &[u8], kind: ObjectKind) -> bool {
    bytes.len() >= ENVELOPE_HEADER_LEN && bytes[..8] == magic::ENVELOPE && bytes[9] == kind.byte()
}

/// Kinds of stored objects, bound into every envelope and MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Chunk,
    Index,
    Manifest,
    PruneRecord,
    Config,
}

impl ObjectKind {
    pub fn byte(self) -> u8 {
        match self {
            ObjectKind::Chunk => 1,
            ObjectKind::Index => 2,
            ObjectKind::Manifest => 3,
            ObjectKind::PruneRecord => 4,
            ObjectKind::Config => 5,
        }
    }

    pub fn from_byte(b: u8) -> Option<ObjectKind> {
        Some(match b {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Index,
            3 => ObjectKind::Manifest,
            4 => ObjectKind::PruneRecord,
            5 => ObjectKind::Config,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Index => "volume index",
            ObjectKind::Manifest => "manifest",
            ObjectKind::PruneRecord => "prune record",
            ObjectKind::Config => "repository config",
        }
    }
}

/// The keys of one repository, derived from its master key (spec/format.md §18.2).
pub struct RepoKeys {
    chunk_id: Key,
    data: Key,
    mac: Key,
}

impl RepoKeys {
    /// HKDF-SHA256 with the repository id (its UTF-8 text) as salt: the same master key
    /// gives unrelated keys in two repositories.
    pub fn derive(master: &Key, repository_id: &str) -> RepoKeys {
        let salt = repository_id.as_bytes();
        RepoKeys {
            chunk_id: hkdf(&master.0, salt, &[INFO_CHUNK_ID]),
            data: hkdf(&master.0, salt, &[INFO_DATA]),
            mac: hkdf(&master.0, salt, &[INFO_MAC]),
        }
    }

    pub fn chunk_id_key(&self) -> &Key {
        &self.chunk_id
    }

    pub fn data_key(&self) -> &Key {
        &self.data
    }

    pub fn mac_key(&self) -> &Key {
        &self.mac
    }

    /// The id of a chunk: HMAC-SHA256(chunk-id key, plaintext); an all-zero chunk keeps
    /// the reserved hole id (§3), which reveals only that the chunk was zeros, as it does
    /// unencrypted (holes are not stored at all).
    pub fn chunk_id(&self, plain: &[u8]) -> Digest {
        if plain.iter().all(|&b| b == 0) {
            return Digest::HOLE;
        }
        let id = self.chunk_mac(plain);
        // Probability 2^-256; a writer must not store a non-zero chunk as a hole.
        assert!(!id.is_hole(), "HMAC-SHA256 produced the reserved hole id");
        id
    }

    /// HMAC-SHA256 of a stored chunk's plaintext, what its id must be (no hole rule: a
    /// stored chunk is never a hole).
    pub fn chunk_mac(&self, plain: &[u8]) -> Digest {
        Digest(hmac(&self.chunk_id, &[plain]))
    }

    /// Published in the repository config: tells a key that unwraps from some slot but
    /// belongs to another repository from the right one, before anything is decrypted.
    pub fn key_check(&self) -> [u8; 32] {
        hmac(&self.mac, &[KEY_CHECK_LABEL])
    }

    /// The MAC of an object in sign-only mode (and of anything else authenticated
    /// without being encrypted).
    pub fn mac(&self, kind: ObjectKind, name: &str, content: &[u8]) -> [u8; 32] {
        hmac(
            &self.mac,
            &[
                MAC_LABEL,
                &[kind.byte()],
                &(name.len() as u32).to_le_bytes(),
                name.as_bytes(),
                content,
            ],
        )
    }

    pub fn verify_mac(
        &self,
        kind: ObjectKind,
        name: &str,
        content: &[u8],
        tag: &[u8],
    ) -> Result<()> {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.mac.0).expect("HMAC takes any key length");
        m.update(MAC_LABEL);
        m.update(&[kind.byte()]);
        m.update(&(name.len() as u32).to_le_bytes());
        m.update(name.as_bytes());
        m.update(content);
        m.verify_slice(tag).map_err(|_| {
            FormatError::corrupt(
                format!("{} {name}", kind.describe()),
                "its MAC does not match: it was changed, forged, or stored under another name",
            )
        })
    }

    /// The per-object AEAD key: HKDF(data key, info = label || algorithm || kind || name).
    pub fn object_key(&self, aead: Aead, kind: ObjectKind, name: &str) -> Key {
        hkdf(
            &self.data.0,
            &[],
            &[INFO_OBJECT, &[aead.byte(), kind.byte()], name.as_bytes()],
        )
    }

    /// Encrypts one object with a fresh random nonce.
    pub fn seal(&self, aead: Aead, kind: ObjectKind, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        self.seal_with_nonce(aead, kind, name, &nonce, plain)
    }

    /// As [`seal`](Self::seal) with a given nonce: for test vectors only. A nonce must
    /// never be used twice with the same object key.
    pub fn seal_with_nonce(
        &self,
        aead: Aead,
        kind: ObjectKind,
        name: &str,
        nonce: &[u8; NONCE_LEN],
        plain: &[u8],
    ) -> Vec<u8> {
        let mut header = [0u8; ENVELOPE_HEADER_LEN];
        header[..8].copy_from_slice(&magic::ENVELOPE);
        header[8] = aead.byte();
        header[9] = kind.byte();
        header[12..].copy_from_slice(nonce);
        let aad = [&header[..], name.as_bytes()].concat();
        let key = self.object_key(aead, kind, name);
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plain.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&aead.seal(&key, nonce, plain, &aad));
        out
    }

    /// Checks and decrypts one object that was stored as `kind` named `name`. Any wrong
    /// byte, a truncation, another key, or another kind or name is refused, naming the
    /// object.
    pub fn open(&self, kind: ObjectKind, name: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let what = || format!("{} {name}", kind.describe());
        let aead = check_envelope(kind, name, sealed)?;
        let nonce: [u8; NONCE_LEN] = sealed[12..ENVELOPE_HEADER_LEN]
            .try_into()
            .expect("12 bytes");
        let aad = [&sealed[..ENVELOPE_HEADER_LEN], name.as_bytes()].concat();
        let key = self.object_key(aead, kind, name);
        aead.open(&key, &nonce, &sealed[ENVELOPE_HEADER_LEN..], &aad)
            .ok_or_else(|| {
                FormatError::corrupt(
                    what(),
                    "authentication failed: it was changed, truncated, stored under another \
                     name, or sealed with another repository's key",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RepoKeys {
        RepoKeys::derive(&Key::from_bytes([7; 32]), "repo-a")
    }

    #[test]
    fn derived_keys_differ_and_depend_on_the_repository() {
        let k = keys();
        let other = RepoKeys::derive(&Key::from_bytes([7; 32]), "repo-b");
        assert_ne!(k.chunk_id_key(), k.data_key());
        assert_ne!(k.data_key(), k.mac_key());
        assert_ne!(k.chunk_id_key(), other.chunk_id_key());
        assert_ne!(k.key_check(), other.key_check());
    }

    #[test]
    fn chunk_ids_are_keyed_and_zeros_stay_holes() {
        let k = keys();
        let plain = vec![5u8; 4096];
        assert_eq!(k.chunk_id(&plain), k.chunk_id(&plain));
        assert_ne!(k.chunk_id(&plain), Digest::of_bytes(&plain));
        assert!(k.chunk_id(&[0; 4096]).is_hole());
        let other = RepoKeys::derive(&Key::from_bytes([8; 32]), "repo-a");
        assert_ne!(k.chunk_id(&plain), other.chunk_id(&plain));
    }

    #[test]
    fn envelopes_round_trip_with_both_algorithms() {
        let k = keys();
        for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            let sealed = k.seal(aead, ObjectKind::Chunk, "ab12", b"hello");
            assert_eq!(sealed.len(), 5 + ENVELOPE_OVERHEAD);
            assert_eq!(sealed[8], aead.byte());
            assert_eq!(
                k.open(ObjectKind::Chunk, "ab12", &sealed).unwrap(),
                b"hello"
            );
            // Random nonces: two seals of the same object differ.
            assert_ne!(sealed, k.seal(aead, ObjectKind::Chunk, "ab12", b"hello"));
        }
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let k = keys();
        for aead in [Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            let sealed = k.seal(aead, ObjectKind::Manifest, "p1", b"manifest body");
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x01;
                let e = k.open(ObjectKind::Manifest, "p1", &bad).unwrap_err();
                assert!(e.to_string().contains("manifest p1"), "{e}");
            }
            for n in 0..sealed.len() {
                assert!(k.open(ObjectKind::Manifest, "p1", &sealed[..n]).is_err());
            }
        }
    }

    #[test]
    fn another_name_kind_or_key_is_refused() {
        let k = keys();
        let sealed = k.seal(Aead::preferred(), ObjectKind::Index, "aa", b"index");
        let e = k.open(ObjectKind::Index, "bb", &sealed).unwrap_err();
        assert!(e.to_string().contains("volume index bb"), "{e}");
        assert!(e.to_string().contains("another name"), "{e}");
        assert!(k.open(ObjectKind::Chunk, "aa", &sealed).is_err());
        // The kind byte rewritten to match: the AEAD still refuses.
        let mut swapped = sealed.clone();
        swapped[9] = ObjectKind::Chunk.byte();
        assert!(k.open(ObjectKind::Chunk, "aa", &swapped).is_err());
        let other = RepoKeys::derive(&Key::from_bytes([9; 32]), "repo-a");
        assert!(other.open(ObjectKind::Index, "aa", &sealed).is_err());
    }

    #[test]
    fn an_unknown_algorithm_is_unsupported() {
        let k = keys();
        let mut sealed = k.seal(Aead::Aes256Gcm, ObjectKind::Chunk, "aa", b"x");
        sealed[8] = 9;
        assert!(matches!(
            k.open(ObjectKind::Chunk, "aa", &sealed),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    fn macs_bind_kind_name_and_content() {
        let k = keys();
        let tag = k.mac(ObjectKind::Manifest, "p1", b"body");
        k.verify_mac(ObjectKind::Manifest, "p1", b"body", &tag)
            .unwrap();
        assert!(k
            .verify_mac(ObjectKind::Manifest, "p2", b"body", &tag)
            .is_err());
        assert!(k
            .verify_mac(ObjectKind::PruneRecord, "p1", b"body", &tag)
            .is_err());
        assert!(k
            .verify_mac(ObjectKind::Manifest, "p1", b"bodz", &tag)
            .is_err());
        assert!(k
            .verify_mac(ObjectKind::Manifest, "p1", b"body", &tag[..31])
            .is_err());
    }

    #[test]
    fn keys_do_not_print() {
        assert_eq!(format!("{:?}", Key::from_bytes([1; 32])), "Key(<secret>)");
    }
}
