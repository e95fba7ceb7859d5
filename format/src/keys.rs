//! Key slots: a repository's master key wrapped for a passphrase (Argon2id) or a key file
//! (32 random bytes), and the `encryption` member of the repository config
//! (spec/format.md §18.5, §18.6).
//!
//! A slot is a sealed document (§6) whose body names its repository, its KDF and its
//! parameters, and holds the master key encrypted under the key that KDF gives. Slots may
//! be stored in the repository (`keys/<slot id>`) or anywhere else: unlocking needs only
//! the slot's bytes and the secret.

use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::{self, Aead, Key, ObjectKind, RepoKeys, KEY_LEN, NONCE_LEN};
use crate::error::{FormatError, Result};
use crate::magic;
use crate::sealed::{self, Features, Kind};

pub const SLOT_KIND: Kind = Kind {
    name: "key slot",
    magic: magic::KEY_SLOT,
    version: 1,
    known_incompat: 0,
};

/// `info` for the key that a key file gives a slot. NEVER CHANGE.
pub const INFO_KEY_FILE: &[u8] = b"bkimg key file slot v1";
/// First line of the associated data of a wrapped master key. NEVER CHANGE.
pub const SLOT_AAD_LABEL: &str = "bkimg key slot v1";
pub const SALT_LEN: usize = 32;
/// Bounds a reader enforces before running Argon2 (a slot must not make it allocate
/// without limit or run for hours).
pub const MAX_MEMORY_KIB: u32 = 4 << 20;
pub const MAX_ITERATIONS: u32 = 64;
pub const MAX_PARALLELISM: u32 = 16;

/// How a repository protects its objects (the config's `encryption.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    None,
    Encrypted,
    Signed,
}

/// The repository config's `encryption` member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub mode: Mode,
    /// Always "hkdf-sha256" in version 1.
    pub key_derivation: String,
    /// "hmac-sha256" when encrypted, "sha256" when signed.
    pub chunk_id: String,
    /// What writers of this repository use; readers go by each object's algorithm byte.
    pub aead: Aead,
    /// HMAC-SHA256(MAC key, "bkimg key check v1"), hex.
    pub key_check: String,
    /// The MAC of the settings above and the repository id (spec/format.md §18.6), hex:
    /// nobody without the key can change the mode (encrypted to signed would make
    /// writers store plaintext) or the algorithms.
    pub mac: String,
}

impl Encryption {
    pub fn new(mode: Mode, keys: &RepoKeys, repository_id: &str) -> Encryption {
        Self::with_aead(mode, keys, repository_id, Aead::preferred())
    }

    /// As [`new`](Self::new) with the writers' algorithm given (test vectors).
    pub fn with_aead(mode: Mode, keys: &RepoKeys, repository_id: &str, aead: Aead) -> Encryption {
        let mut e = Encryption {
            mode,
            key_derivation: "hkdf-sha256".into(),
            chunk_id: match mode {
                Mode::Encrypted => "hmac-sha256".into(),
                _ => "sha256".into(),
            },
            aead,
            key_check: hex::encode(keys.key_check()),
            mac: String::new(),
        };
        e.mac = hex::encode(keys.mac(ObjectKind::Config, repository_id, &e.mac_content()));
        e
    }

    /// What the config's MAC covers: each setting on a line of its own.
    pub fn mac_content(&self) -> Vec<u8> {
        let mode = match self.mode {
            Mode::None => "none",
            Mode::Encrypted => "encrypted",
            Mode::Signed => "signed",
        };
        format!(
            "mode={mode}\nkey_derivation={}\nchunk_id={}\naead={}\nkey_check={}\n",
            self.key_derivation,
            self.chunk_id,
            self.aead.name(),
            self.key_check
        )
        .into_bytes()
    }

    /// Derives the repository's keys from a master key and checks them against
    /// `key_check`: a key of another repository is refused here.
    pub fn keys(&self, master: &Key, repository_id: &str) -> Result<RepoKeys> {
        let keys = RepoKeys::derive(master, repository_id);
        if hex::encode(keys.key_check()) != self.key_check {
            return Err(FormatError::Denied(format!(
                "the key unlocked does not belong to repository {repository_id} \
                 (a key slot or key file of another repository?)"
            )));
        }
        let mac = hex::decode(&self.mac).unwrap_or_default();
        keys.verify_mac(ObjectKind::Config, repository_id, &self.mac_content(), &mac)
            .map_err(|_| {
                FormatError::corrupt(
                    format!("repository config of {repository_id}"),
                    "its encryption settings do not match their MAC: someone without the key \
                 changed the mode or the algorithms (restore the config from a copy)",
                )
            })?;
        Ok(keys)
    }
}

/// Argon2id cost parameters, recorded in every passphrase slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Argon2Params {
    /// About 0.5 s on the reference machine (spec/format.md §18.5 has the measurement).
    pub const DEFAULT: Argon2Params = Argon2Params {
        memory_kib: 256 << 10,
        iterations: 2,
        parallelism: 1,
    };

    fn check(&self) -> std::result::Result<(), String> {
        if self.memory_kib > MAX_MEMORY_KIB
            || self.iterations == 0
            || self.iterations > MAX_ITERATIONS
            || self.parallelism == 0
            || self.parallelism > MAX_PARALLELISM
            || self.memory_kib < 8 * self.parallelism
        {
            return Err(format!(
                "Argon2id parameters out of bounds: {} KiB, {} iterations, {} lanes",
                self.memory_kib, self.iterations, self.parallelism
            ));
        }
        Ok(())
    }
}

/// The key derivation of one slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Kdf {
    /// A passphrase through Argon2id version 0x13.
    Argon2id {
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
        salt: String,
    },
    /// A key file's 32 bytes through HKDF-SHA256.
    HkdfSha256 { salt: String },
}

impl Kdf {
    pub fn argon2(params: Argon2Params, salt: String) -> Kdf {
        Kdf::Argon2id {
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
            salt,
        }
    }

    /// The Argon2id parameters of a passphrase slot.
    pub fn params(&self) -> Option<Argon2Params> {
        match *self {
            Kdf::Argon2id {
                memory_kib,
                iterations,
                parallelism,
                ..
            } => Some(Argon2Params {
                memory_kib,
                iterations,
                parallelism,
            }),
            Kdf::HkdfSha256 { .. } => None,
        }
    }

    /// The slot kind shown to people and bound into the wrapping.
    pub fn kind(&self) -> &'static str {
        match self {
            Kdf::Argon2id { .. } => "passphrase",
            Kdf::HkdfSha256 { .. } => "key-file",
        }
    }

    /// One line that names every parameter; part of the wrapped key's associated data.
    fn canonical(&self) -> String {
        match self {
            Kdf::Argon2id {
                memory_kib: m,
                iterations: t,
                parallelism: p,
                salt,
            } => format!("argon2id v=19 m={m} t={t} p={p} salt={salt}"),
            Kdf::HkdfSha256 { salt } => format!("hkdf-sha256 salt={salt}"),
        }
    }
}

/// The master key, encrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wrapped {
    /// Always "chacha20-poly1305" in version 1.
    pub algorithm: String,
    pub nonce: String,
    /// 32 bytes of key and 16 of tag, hex.
    pub ciphertext: String,
}

/// What unlocks a slot.
#[derive(Clone, Copy)]
pub enum Secret<'a> {
    Passphrase(&'a [u8]),
    KeyFile(&'a Key),
}

/// One key slot (the body of its sealed document).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub slot_id: String,
    pub repository_id: String,
    pub created: String,
    pub kdf: Kdf,
    pub wrapped: Wrapped,
}

/// A slot id: 16 lowercase hex digits.
pub fn valid_slot_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_slot_id() -> String {
    let mut b = [0u8; 8];
    crypto::fill_random(&mut b);
    hex::encode(b)
}

impl Slot {
    /// Wraps `master` for `secret` with fresh random salt and nonce.
    pub fn create(
        master: &Key,
        repository_id: &str,
        slot_id: &str,
        created: &str,
        secret: Secret,
        params: Argon2Params,
    ) -> Result<Slot> {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        crypto::fill_random(&mut salt);
        crypto::fill_random(&mut nonce);
        Slot::create_with(
            master,
            repository_id,
            slot_id,
            created,
            secret,
            params,
            &salt,
            &nonce,
        )
    }

    /// As [`create`](Self::create) with given salt and nonce: for test vectors.
    #[allow(clippy::too_many_arguments)]
    pub fn create_with(
        master: &Key,
        repository_id: &str,
        slot_id: &str,
        created: &str,
        secret: Secret,
        params: Argon2Params,
        salt: &[u8; SALT_LEN],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Slot> {
        let salt = hex::encode(salt);
        let kdf = match secret {
            Secret::Passphrase(_) => Kdf::argon2(params, salt),
            Secret::KeyFile(_) => Kdf::HkdfSha256 { salt },
        };
        let mut slot = Slot {
            slot_id: slot_id.to_string(),
            repository_id: repository_id.to_string(),
            created: created.to_string(),
            kdf,
            wrapped: Wrapped {
                algorithm: "chacha20-poly1305".into(),
                nonce: hex::encode(nonce),
                ciphertext: String::new(),
            },
        };
        slot.check()?;
        let kek = slot.kek(&secret)?;
        let ct = ChaCha20Poly1305::new(kek.as_bytes().into())
            .encrypt(
                nonce.into(),
                Payload {
                    msg: master.as_bytes(),
                    aad: slot.aad().as_bytes(),
                },
            )
            .expect("wrapping 32 bytes cannot fail");
        slot.wrapped.ciphertext = hex::encode(ct);
        Ok(slot)
    }

    pub fn kind(&self) -> &'static str {
        self.kdf.kind()
    }

    fn aad(&self) -> String {
        format!(
            "{SLOT_AAD_LABEL}\n{}\n{}\n{}\n{}",
            self.repository_id,
            self.slot_id,
            self.kind(),
            self.kdf.canonical()
        )
    }

    fn salt(&self) -> Result<Vec<u8>> {
        let salt = match &self.kdf {
            Kdf::Argon2id { salt, .. } | Kdf::HkdfSha256 { salt } => salt,
        };
        match hex::decode(salt) {
            Ok(s) if s.len() == SALT_LEN => Ok(s),
            _ => Err(self.corrupt(format!("salt is not {SALT_LEN} bytes of hex"))),
        }
    }

    fn corrupt(&self, detail: String) -> FormatError {
        FormatError::corrupt(format!("key slot {}", self.slot_id), detail)
    }

    /// Structural checks a reader makes before running any KDF.
    fn check(&self) -> Result<()> {
        if !valid_slot_id(&self.slot_id) {
            return Err(FormatError::corrupt(
                "key slot",
                format!("slot id {:?} is not 16 hex digits", self.slot_id),
            ));
        }
        if self.wrapped.algorithm != "chacha20-poly1305" {
            return Err(FormatError::unsupported(
                format!("key slot {}", self.slot_id),
                format!("key wrapping algorithm {:?}", self.wrapped.algorithm),
            ));
        }
        if let Some(params) = self.kdf.params() {
            params.check().map_err(|d| self.corrupt(d))?;
        }
        self.salt()?;
        match hex::decode(&self.wrapped.nonce) {
            Ok(n) if n.len() == NONCE_LEN => Ok(()),
            _ => Err(self.corrupt(format!("nonce is not {NONCE_LEN} bytes of hex"))),
        }
    }

    /// The key-encryption key for `secret`.
    fn kek(&self, secret: &Secret) -> Result<Key> {
        let salt = self.salt()?;
        match (&self.kdf, secret) {
            (kdf @ Kdf::Argon2id { .. }, Secret::Passphrase(p)) => {
                let params = kdf.params().expect("an Argon2id slot");
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    argon2::Params::new(
                        params.memory_kib,
                        params.iterations,
                        params.parallelism,
                        Some(KEY_LEN),
                    )
                    .map_err(|e| self.corrupt(format!("Argon2id parameters: {e}")))?,
                );
                let mut out = Zeroizing::new([0u8; KEY_LEN]);
                argon
                    .hash_password_into(p, &salt, out.as_mut())
                    .map_err(|e| self.corrupt(format!("Argon2id: {e}")))?;
                Ok(Key::from_bytes(*out))
            }
            (Kdf::HkdfSha256 { .. }, Secret::KeyFile(k)) => {
                Ok(crypto::hkdf(k.as_bytes(), &salt, &[INFO_KEY_FILE]))
            }
            (kdf, _) => Err(FormatError::Denied(format!(
                "key slot {} is a {} slot: give a {}",
                self.slot_id,
                kdf.kind(),
                match kdf {
                    Kdf::Argon2id { .. } => "passphrase",
                    Kdf::HkdfSha256 { .. } => "key file (--key-file)",
                }
            ))),
        }
    }

    /// The master key, or [`FormatError::Denied`] for a wrong passphrase or key file.
    pub fn unlock(&self, secret: Secret) -> Result<Key> {
        self.check()?;
        let kek = self.kek(&secret)?;
        let nonce: [u8; NONCE_LEN] = hex::decode(&self.wrapped.nonce)
            .expect("checked")
            .try_into()
            .expect("checked");
        let ct = hex::decode(&self.wrapped.ciphertext)
            .map_err(|_| self.corrupt("wrapped key is not hex".into()))?;
        if ct.len() != KEY_LEN + crypto::TAG_LEN {
            return Err(self.corrupt(format!(
                "wrapped key is {} bytes, not {}",
                ct.len(),
                KEY_LEN + crypto::TAG_LEN
            )));
        }
        let mut plain = ChaCha20Poly1305::new(kek.as_bytes().into())
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: &ct,
                    aad: self.aad().as_bytes(),
                },
            )
            .map_err(|_| {
                FormatError::Denied(format!(
                    "the {} does not unlock key slot {} (or the slot was altered)",
                    match self.kdf {
                        Kdf::Argon2id { .. } => "passphrase",
                        Kdf::HkdfSha256 { .. } => "key file",
                    },
                    self.slot_id
                ))
            })?;
        let key: [u8; KEY_LEN] = plain.as_slice().try_into().expect("32 bytes");
        plain.zeroize();
        Ok(Key::from_bytes(key))
    }

    /// Refuses a slot stored under another id or made for another repository (a slot
    /// file copied from elsewhere).
    pub fn check_stored_as(&self, id: &str, repository_id: &str) -> Result<()> {
        if self.slot_id != id || self.repository_id != repository_id {
            return Err(FormatError::corrupt(
                format!("key slot {id}"),
                "it names another slot or repository (copied from elsewhere?)",
            ));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        sealed::seal(&SLOT_KIND, Features::default(), self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Slot> {
        let (slot, _): (Slot, _) = sealed::open(&SLOT_KIND, bytes)?;
        slot.check()?;
        Ok(slot)
    }
}

/// A key file: exactly 32 bytes, or their 64 hex digits (surrounding white space ignored).
pub fn parse_key_file(bytes: &[u8]) -> Result<Key> {
    if let Ok(k) = <[u8; KEY_LEN]>::try_from(bytes) {
        return Ok(Key::from_bytes(k));
    }
    let text = Zeroizing::new(String::from_utf8_lossy(bytes).trim().to_string());
    match hex::decode(text.as_bytes()) {
        Ok(v) if v.len() == KEY_LEN => {
            let v = Zeroizing::new(v);
            Ok(Key::from_bytes(v.as_slice().try_into().expect("32 bytes")))
        }
        _ => Err(FormatError::Denied(format!(
            "not a bkimg key file: it must hold 32 bytes (or 64 hex digits), it holds {}",
            bytes.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Argon2Params = Argon2Params {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    fn slot(secret: Secret) -> (Key, Slot) {
        let master = Key::random();
        let s = Slot::create(&master, "repo", &new_slot_id(), "now", secret, SMALL).unwrap();
        (master, s)
    }

    #[test]
    fn a_passphrase_slot_unlocks_with_its_passphrase_only() {
        let (master, s) = slot(Secret::Passphrase(b"correct horse"));
        let s = Slot::decode(&s.encode()).unwrap();
        assert_eq!(
            s.unlock(Secret::Passphrase(b"correct horse")).unwrap(),
            master
        );
        let e = s.unlock(Secret::Passphrase(b"wrong")).unwrap_err();
        assert!(matches!(e, FormatError::Denied(_)), "{e}");
        assert!(e.to_string().contains("passphrase does not unlock"), "{e}");
        let k = Key::random();
        assert!(matches!(
            s.unlock(Secret::KeyFile(&k)),
            Err(FormatError::Denied(_))
        ));
    }

    #[test]
    fn a_key_file_slot_unlocks_with_its_key_file_only() {
        let file = Key::random();
        let (master, s) = slot(Secret::KeyFile(&file));
        assert_eq!(s.kind(), "key-file");
        assert_eq!(s.unlock(Secret::KeyFile(&file)).unwrap(), master);
        let e = s.unlock(Secret::KeyFile(&Key::random())).unwrap_err();
        assert!(e.to_string().contains("key file does not unlock"), "{e}");
    }

    #[test]
    fn tampered_slots_are_refused() {
        let (_, s) = slot(Secret::Passphrase(b"pw"));
        // Parameters lowered, repository or id changed: the wrapping no longer opens.
        let mut weaker = s.clone();
        if let Kdf::Argon2id { memory_kib, .. } = &mut weaker.kdf {
            *memory_kib = 32;
        }
        let mut moved = s.clone();
        moved.repository_id = "other".into();
        let mut flipped = s.clone();
        flipped.wrapped.ciphertext.replace_range(0..1, "f");
        if flipped == s {
            flipped.wrapped.ciphertext.replace_range(0..1, "0");
        }
        for bad in [weaker, moved, flipped] {
            assert!(matches!(
                bad.unlock(Secret::Passphrase(b"pw")),
                Err(FormatError::Denied(_))
            ));
        }
        // A flipped byte in the document: its digest refuses it before any KDF runs.
        let mut bytes = s.encode();
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        assert!(matches!(
            Slot::decode(&bytes),
            Err(FormatError::Corrupt { .. })
        ));
        for n in [0, 10, 64, bytes.len() - 1] {
            assert!(Slot::decode(&s.encode()[..n]).is_err());
        }
    }

    #[test]
    fn absurd_parameters_are_refused_before_running() {
        let (_, mut s) = slot(Secret::Passphrase(b"pw"));
        if let Kdf::Argon2id { memory_kib, .. } = &mut s.kdf {
            *memory_kib = u32::MAX;
        }
        let e = Slot::decode(&s.encode()).unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    #[test]
    fn the_key_check_refuses_another_repositorys_key() {
        let master = Key::random();
        let keys = RepoKeys::derive(&master, "r1");
        let enc = Encryption::new(Mode::Encrypted, &keys, "r1");
        assert!(enc.keys(&master, "r1").is_ok());
        let mut signed = enc.clone();
        signed.mode = Mode::Signed;
        signed.chunk_id = "sha256".into();
        assert!(matches!(
            signed.keys(&master, "r1"),
            Err(FormatError::Corrupt { .. })
        ));
        assert!(matches!(
            enc.keys(&Key::random(), "r1"),
            Err(FormatError::Denied(_))
        ));
        assert!(enc.keys(&master, "r2").is_err());
    }

    #[test]
    fn key_files_are_raw_or_hex() {
        let k = Key::random();
        assert_eq!(parse_key_file(k.as_bytes()).unwrap(), k);
        let text = format!("{}\n", hex::encode(k.as_bytes()));
        assert_eq!(parse_key_file(text.as_bytes()).unwrap(), k);
        assert!(parse_key_file(b"short").is_err());
    }
}
