//! How a repository's objects are protected on the way to and from its store
//! (spec/format.md §18): chunk ids, the single-object envelope of chunks, manifests and
//! prune records, the segmented envelope of volume indexes (which are streamed, never held
//! whole), and the MAC envelope of a sign-only repository.
//!
//! A [`Protection`] is made once per opened repository from its config and unlocked key;
//! [`crate::store::Protected`] applies it to every object a store reads or writes.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::crypto::{fill_random, Aead, Key, ObjectKind, RepoKeys, NONCE_LEN, TAG_LEN};
use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::keys::{Encryption, Mode, Secret, Slot};
use crate::magic;
use crate::store::local::RepoConfig;

/// How chunk ids are computed: SHA-256 of the plaintext, or HMAC-SHA256 with the
/// repository's chunk-id key (§18.3). All-zero chunks are holes either way.
#[derive(Clone, Default)]
pub enum ChunkIds {
    #[default]
    Sha256,
    Keyed(Arc<RepoKeys>),
}

impl ChunkIds {
    /// The id of a chunk's plaintext, or [`Digest::HOLE`] when it is all zeros.
    pub fn of(&self, plain: &[u8]) -> Digest {
        match self {
            ChunkIds::Sha256 => Digest::of_chunk(plain),
            ChunkIds::Keyed(keys) => keys.chunk_id(plain),
        }
    }

    /// What the id of a stored chunk with this plaintext must be: as [`of`](Self::of)
    /// but without the hole rule, so that no stored chunk passes as a hole.
    pub fn of_stored(&self, plain: &[u8]) -> Digest {
        match self {
            ChunkIds::Sha256 => Digest::of_bytes(plain),
            ChunkIds::Keyed(keys) => keys.chunk_mac(plain),
        }
    }

    /// What a mismatch is called in messages.
    pub fn name(&self) -> &'static str {
        match self {
            ChunkIds::Sha256 => "SHA-256 digest",
            ChunkIds::Keyed(_) => "keyed id (HMAC-SHA256)",
        }
    }
}

impl std::fmt::Debug for ChunkIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The protection of one repository: its mode and, unless `none`, its keys.
pub struct Protection {
    mode: Mode,
    aead: Aead,
    keys: Option<Arc<RepoKeys>>,
}

impl Protection {
    /// A repository without an `encryption` member.
    pub fn none() -> Protection {
        Protection {
            mode: Mode::None,
            aead: Aead::preferred(),
            keys: None,
        }
    }

    /// A repository whose config has `encryption`, with the keys its key check accepted.
    pub fn new(encryption: &Encryption, keys: RepoKeys) -> Protection {
        Protection {
            mode: encryption.mode,
            aead: encryption.aead,
            keys: (encryption.mode != Mode::None).then(|| Arc::new(keys)),
        }
    }

    /// Unlocks a repository from its config and stored key slots (id and bytes) with one
    /// secret: the first slot of the secret's kind that it opens. A secret that opens
    /// none is [`FormatError::Denied`]; a slot of another repository is corrupt.
    pub fn unlock(
        config: &RepoConfig,
        slots: &[(String, Vec<u8>)],
        secret: Secret,
    ) -> Result<Protection> {
        let Some(enc) = &config.encryption else {
            return Ok(Protection::none());
        };
        let kind = match secret {
            Secret::Passphrase(_) => "passphrase",
            Secret::KeyFile(_) => "key-file",
        };
        let mut tried = 0;
        for (id, bytes) in slots {
            let slot = Slot::decode(bytes)?;
            slot.check_stored_as(id, &config.repository_id)?;
            if slot.kind() != kind {
                continue;
            }
            tried += 1;
            match slot.unlock(secret) {
                Ok(master) => {
                    let keys = enc.keys(&master, &config.repository_id)?;
                    return Ok(Protection::new(enc, keys));
                }
                Err(FormatError::Denied(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FormatError::Denied(format!(
            "the {} unlocks none of the {tried} {kind} slot(s) of repository {}",
            if kind == "key-file" {
                "key file"
            } else {
                "passphrase"
            },
            config.repository_id
        )))
    }

    /// A signed repository read without its key (`--unauthenticated`): manifests and prune
    /// records are taken out of their MAC envelopes unchecked, so anyone who could write to
    /// the repository could have forged them. An encrypted repository cannot be read so.
    /// Nothing can be written through it.
    pub fn unauthenticated(encryption: &Encryption) -> Result<Protection> {
        if encryption.mode == Mode::Encrypted {
            return Err(FormatError::Denied(
                "the repository is encrypted: it cannot be read without its key (only a \
                 signed repository can be read unauthenticated)"
                    .into(),
            ));
        }
        Ok(Protection {
            mode: encryption.mode,
            aead: encryption.aead,
            keys: None,
        })
    }

    /// Whether what is read is checked against the repository's keys (false only for
    /// [`unauthenticated`](Self::unauthenticated)).
    pub fn authenticated(&self) -> bool {
        self.mode == Mode::None || self.keys.is_some()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether chunks, indexes and documents are stored in envelopes.
    pub fn encrypts(&self) -> bool {
        self.mode == Mode::Encrypted
    }

    pub fn chunk_ids(&self) -> ChunkIds {
        match (&self.keys, self.mode) {
            (Some(keys), Mode::Encrypted) => ChunkIds::Keyed(keys.clone()),
            _ => ChunkIds::Sha256,
        }
    }

    fn keys(&self) -> &Arc<RepoKeys> {
        self.keys.as_ref().expect("a protected mode has keys")
    }

    /// The stored form of a chunk blob, or `None` when it is stored as it is.
    pub fn seal_chunk(&self, id: &Digest, blob: &[u8]) -> Option<Vec<u8>> {
        self.encrypts().then(|| {
            self.keys()
                .seal(self.aead, ObjectKind::Chunk, &id.to_hex(), blob)
        })
    }

    /// Turns a stored chunk back into its blob, in place.
    pub fn open_chunk(&self, id: &Digest, stored: &mut Vec<u8>) -> Result<()> {
        if self.encrypts() {
            *stored = self.keys().open(ObjectKind::Chunk, &id.to_hex(), stored)?;
        }
        Ok(())
    }

    /// The stored form of a manifest or prune record (`name` is the restore point's id).
    pub fn seal_document(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        if !self.authenticated() {
            return Err(FormatError::Denied(format!(
                "{} {name} cannot be signed: the repository was opened without its key",
                kind.describe()
            )));
        }
        Ok(match self.mode {
            Mode::None => bytes.to_vec(),
            Mode::Encrypted => self.keys().seal(self.aead, kind, name, bytes),
            Mode::Signed => mac_seal(self.keys(), kind, name, bytes),
        })
    }

    /// Checks a stored manifest or prune record and returns its plain bytes.
    pub fn open_document(&self, kind: ObjectKind, name: &str, stored: Vec<u8>) -> Result<Vec<u8>> {
        match self.mode {
            Mode::None => Ok(stored),
            Mode::Encrypted => self.keys().open(kind, name, &stored),
            Mode::Signed => match &self.keys {
                Some(keys) => mac_open(keys, kind, name, &stored),
                None => mac_strip(kind, name, &stored).map(<[u8]>::to_vec),
            },
        }
    }

    /// A writer that seals an index as it is written (encrypted mode), or `None`.
    pub fn index_sealer<W: Write>(&self, id: &Digest, out: W) -> Option<StreamSealer<W>> {
        self.encrypts()
            .then(|| StreamSealer::new(self.keys(), self.aead, ObjectKind::Index, id.to_hex(), out))
    }

    /// Reads a stored index as its plain bytes.
    pub fn open_index(
        &self,
        id: &Digest,
        stored: Box<dyn Read + Send>,
    ) -> Result<Box<dyn Read + Send>> {
        if !self.encrypts() {
            return Ok(stored);
        }
        Ok(Box::new(StreamOpener::new(
            self.keys(),
            ObjectKind::Index,
            id.to_hex(),
            stored,
        )?))
    }
}

// ---------------------------------------------------------------------------------------
// MAC envelope (signed mode, §18.7)

pub const MAC_HEADER_LEN: usize = 12;
pub const MAC_LEN: usize = 32;

/// `magic(8) kind(1) reserved(3) content MAC(32)`, the MAC over kind, name and content.
pub fn mac_seal(keys: &RepoKeys, kind: ObjectKind, name: &str, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAC_HEADER_LEN + content.len() + MAC_LEN);
    out.extend_from_slice(&magic::MAC_ENVELOPE);
    out.extend_from_slice(&[kind.byte(), 0, 0, 0]);
    out.extend_from_slice(content);
    out.extend_from_slice(&keys.mac(kind, name, content));
    out
}

/// Checks a MAC envelope made by [`mac_seal`] for `kind` and `name`; returns the content.
pub fn mac_open(keys: &RepoKeys, kind: ObjectKind, name: &str, stored: &[u8]) -> Result<Vec<u8>> {
    let content = mac_strip(kind, name, stored)?;
    let tag = &stored[stored.len() - MAC_LEN..];
    keys.verify_mac(kind, name, content, tag)?;
    Ok(content.to_vec())
}

/// The content of a MAC envelope whose form is checked but not its MAC (a signed
/// repository read without its key).
pub fn mac_strip<'a>(kind: ObjectKind, name: &str, stored: &'a [u8]) -> Result<&'a [u8]> {
    let what = || format!("{} {name}", kind.describe());
    if stored.len() < MAC_HEADER_LEN + MAC_LEN {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "{} bytes, shorter than a signed object's {}-byte envelope (truncated, or \
                 written without the repository's key)",
                stored.len(),
                MAC_HEADER_LEN + MAC_LEN
            ),
        ));
    }
    if stored[..8] != magic::MAC_ENVELOPE {
        return Err(FormatError::corrupt(
            what(),
            "it carries no MAC, and this repository signs every manifest and prune record \
             (written without the key, or forged)",
        ));
    }
    if stored[8] != kind.byte() {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "it is signed as object kind {}, not as a {} (swapped?)",
                stored[8],
                kind.describe()
            ),
        ));
    }
    if stored[9..12] != [0, 0, 0] {
        return Err(FormatError::corrupt(
            what(),
            "reserved envelope bytes are not zero",
        ));
    }
    Ok(&stored[MAC_HEADER_LEN..stored.len() - MAC_LEN])
}

// ---------------------------------------------------------------------------------------
// Segmented envelope (volume indexes, §18.4.1)

pub const STREAM_HEADER_LEN: usize = 12;
/// Plaintext bytes per segment: 2^20 (1 MiB). The only value version 1 allows.
pub const SEGMENT_LOG2: u8 = 20;
pub const SEGMENT_LEN: usize = 1 << SEGMENT_LOG2;
const SEALED_SEGMENT_LEN: usize = NONCE_LEN + SEGMENT_LEN + TAG_LEN;

fn stream_header(aead: Aead, kind: ObjectKind) -> [u8; STREAM_HEADER_LEN] {
    let mut h = [0u8; STREAM_HEADER_LEN];
    h[..8].copy_from_slice(&magic::ENVELOPE_STREAM);
    h[8] = aead.byte();
    h[9] = kind.byte();
    h[11] = SEGMENT_LOG2;
    h
}

fn segment_aad(header: &[u8], index: u64, last: bool, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(STREAM_HEADER_LEN + 9 + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(u8::from(last));
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Checks the header of a segmented envelope stored as `kind` named `name` (spec/format.md
/// §18.4.1) and returns its algorithm: what can be checked without the key. Only opening
/// its segments ([`StreamOpener`]) authenticates it.
pub fn check_stream_header(
    kind: ObjectKind,
    name: &str,
    header: &[u8; STREAM_HEADER_LEN],
) -> Result<Aead> {
    let what = || format!("{} {name}", kind.describe());
    if header[..8] != magic::ENVELOPE_STREAM {
        return Err(FormatError::corrupt(
            what(),
            "not an encrypted bkimg stream (wrong magic number; written without the key?)",
        ));
    }
    let Some(aead) = Aead::from_byte(header[8]) else {
        return Err(FormatError::unsupported(
            what(),
            format!("encryption algorithm {}", header[8]),
        ));
    };
    if header[9] != kind.byte() {
        return Err(FormatError::corrupt(
            what(),
            format!(
                "it is sealed as object kind {}, not as a {} (swapped?)",
                header[9],
                kind.describe()
            ),
        ));
    }
    if header[10] != 0 {
        return Err(FormatError::corrupt(
            what(),
            "reserved stream byte is not zero",
        ));
    }
    if header[11] != SEGMENT_LOG2 {
        return Err(FormatError::unsupported(
            what(),
            format!("segments of 2^{} bytes", header[11]),
        ));
    }
    Ok(aead)
}

/// Seals a stream as it is written: 1 MiB segments, each with a fresh random nonce and
/// its number and whether it is the last bound in the associated data, so segments cannot
/// be reordered, dropped or cut off at a boundary. [`finish`](Self::finish) writes the
/// last segment (possibly empty) and must be called.
pub struct StreamSealer<W: Write> {
    key: Key,
    header: [u8; STREAM_HEADER_LEN],
    name: String,
    out: W,
    buf: Vec<u8>,
    next: u64,
    header_written: bool,
    /// Fixed nonces by segment number, for test vectors only.
    fixed_nonces: Option<Box<dyn FnMut(u64) -> [u8; NONCE_LEN]>>,
}

impl<W: Write> StreamSealer<W> {
    pub fn new(
        keys: &RepoKeys,
        aead: Aead,
        kind: ObjectKind,
        name: String,
        out: W,
    ) -> StreamSealer<W> {
        let key = keys.object_key(aead, kind, &name);
        StreamSealer {
            key,
            header: stream_header(aead, kind),
            name,
            out,
            buf: Vec::with_capacity(SEGMENT_LEN),
            next: 0,
            header_written: false,
            fixed_nonces: None,
        }
    }

    /// Takes each segment's nonce from `nonces` instead of the random generator: for test
    /// vectors only (a nonce must never repeat under one object key).
    pub fn with_fixed_nonces(
        mut self,
        nonces: impl FnMut(u64) -> [u8; NONCE_LEN] + 'static,
    ) -> StreamSealer<W> {
        self.fixed_nonces = Some(Box::new(nonces));
        self
    }

    fn seal_buffer(&mut self, last: bool) -> io::Result<()> {
        if !self.header_written {
            self.out.write_all(&self.header)?;
            self.header_written = true;
        }
        let nonce = match &mut self.fixed_nonces {
            Some(f) => f(self.next),
            None => {
                let mut n = [0u8; NONCE_LEN];
                fill_random(&mut n);
                n
            }
        };
        let aad = segment_aad(&self.header, self.next, last, &self.name);
        let aead = Aead::from_byte(self.header[8]).expect("written by us");
        let sealed = aead.seal(&self.key, &nonce, &self.buf, &aad);
        self.out.write_all(&nonce)?;
        self.out.write_all(&sealed)?;
        self.buf.clear();
        self.next += 1;
        Ok(())
    }

    /// Seals what is buffered as the last segment and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_buffer(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for StreamSealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full buffer is sealed only once more data shows it is not the last segment.
        if self.buf.len() == SEGMENT_LEN {
            self.seal_buffer(false)?;
        }
        let n = data.len().min(SEGMENT_LEN - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens a stream made by [`StreamSealer`], one segment at a time (memory stays at one
/// segment whatever the object's size). A damaged, reordered, dropped or cut-off segment
/// is an error from `read` (kind `InvalidData`) naming the object.
pub struct StreamOpener<R: Read> {
    key: Key,
    aead: Aead,
    header: [u8; STREAM_HEADER_LEN],
    name: String,
    kind: ObjectKind,
    input: R,
    /// Sealed bytes read ahead: at most one segment and one byte.
    sealed: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    next: u64,
    done: bool,
}

impl<R: Read> StreamOpener<R> {
    /// Reads and checks the header and opens the first segment.
    pub fn new(
        keys: &RepoKeys,
        kind: ObjectKind,
        name: String,
        mut input: R,
    ) -> Result<StreamOpener<R>> {
        let label = format!("{} {name}", kind.describe());
        let what = || label.clone();
        let mut header = [0u8; STREAM_HEADER_LEN];
        read_full(&mut input, &mut header)
            .map_err(|e| FormatError::io(what(), e))
            .and_then(|n| {
                if n < STREAM_HEADER_LEN {
                    Err(FormatError::corrupt(
                        what(),
                        format!(
                            "{n} bytes, shorter than an encrypted stream's header (truncated?)"
                        ),
                    ))
                } else {
                    Ok(())
                }
            })?;
        let aead = check_stream_header(kind, &name, &header)?;
        let key = keys.object_key(aead, kind, &name);
        let mut opener = StreamOpener {
            key,
            aead,
            header,
            name,
            kind,
            input,
            sealed: Vec::with_capacity(SEALED_SEGMENT_LEN + 1),
            plain: Vec::new(),
            pos: 0,
            next: 0,
            done: false,
        };
        opener
            .next_segment()
            .map_err(|e| FormatError::corrupt(what(), e.to_string()))?;
        Ok(opener)
    }

    fn damaged(&self, detail: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} {} is damaged: {detail}",
                self.kind.describe(),
                self.name
            ),
        )
    }

    /// Opens the next segment into `plain`.
    fn next_segment(&mut self) -> io::Result<()> {
        // `sealed` may hold the one byte read ahead to see whether a segment was the last.
        let have = self.sealed.len();
        self.sealed.resize(SEALED_SEGMENT_LEN + 1, 0);
        let n = have + read_full(&mut self.input, &mut self.sealed[have..])?;
        self.sealed.truncate(n);
        let last = n <= SEALED_SEGMENT_LEN;
        let seg_len = n.min(SEALED_SEGMENT_LEN);
        if seg_len < NONCE_LEN + TAG_LEN {
            return Err(self.damaged(format!(
                "segment {} is {seg_len} bytes, shorter than its nonce and tag (truncated?)",
                self.next
            )));
        }
        let nonce: [u8; NONCE_LEN] = self.sealed[..NONCE_LEN].try_into().expect("12 bytes");
        let aad = segment_aad(&self.header, self.next, last, &self.name);
        let Some(plain) = self
            .aead
            .open(&self.key, &nonce, &self.sealed[NONCE_LEN..seg_len], &aad)
        else {
            return Err(self.damaged(format!(
                "segment {} fails authentication: changed, truncated, reordered, stored under \
                 another name, or sealed with another repository's key",
                self.next
            )));
        };
        self.plain = plain;
        self.pos = 0;
        self.next += 1;
        // Keep the read-ahead byte for the next segment.
        self.sealed.drain(..seg_len);
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for StreamOpener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            self.next_segment()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Arc<RepoKeys> {
        Arc::new(RepoKeys::derive(&Key::from_bytes([9; 32]), "repo"))
    }

    fn seal(keys: &Arc<RepoKeys>, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut s = StreamSealer::new(
            keys,
            Aead::ChaCha20Poly1305,
            ObjectKind::Index,
            name.into(),
            Vec::new(),
        );
        // Odd write sizes: segment boundaries fall inside writes.
        for part in plain.chunks(333_333) {
            s.write_all(part).unwrap();
        }
        s.finish().unwrap()
    }

    fn open(
        keys: &Arc<RepoKeys>,
        name: &str,
        sealed: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        let mut r = StreamOpener::new(keys, ObjectKind::Index, name.into(), sealed)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn streams_of_every_shape_round_trip() {
        let k = keys();
        for len in [
            0,
            1,
            SEGMENT_LEN - 1,
            SEGMENT_LEN,
            SEGMENT_LEN + 1,
            3 * SEGMENT_LEN,
            3 * SEGMENT_LEN + 77,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = seal(&k, "a", &plain);
            let segments = len.div_ceil(SEGMENT_LEN).max(1);
            assert_eq!(
                sealed.len(),
                STREAM_HEADER_LEN + len + segments * (NONCE_LEN + TAG_LEN),
                "{len}"
            );
            assert_eq!(open(&k, "a", &sealed).unwrap(), plain, "{len}");
        }
    }

    #[test]
    fn cut_reordered_renamed_or_flipped_streams_are_refused() {
        let k = keys();
        let plain: Vec<u8> = (0..2 * SEGMENT_LEN + 10).map(|i| (i % 253) as u8).collect();
        let sealed = seal(&k, "a", &plain);
        let seg = SEALED_SEGMENT_LEN;
        // Cut at a segment boundary: the new last segment was sealed as not last.
        let cut = &sealed[..STREAM_HEADER_LEN + 2 * seg];
        assert!(open(&k, "a", cut).unwrap_err().contains("segment 1 fails"));
        // Cut inside a segment.
        assert!(open(&k, "a", &sealed[..sealed.len() - 1]).is_err());
        // Two segments swapped.
        let mut swapped = sealed[..STREAM_HEADER_LEN].to_vec();
        swapped.extend_from_slice(&sealed[STREAM_HEADER_LEN + seg..STREAM_HEADER_LEN + 2 * seg]);
        swapped.extend_from_slice(&sealed[STREAM_HEADER_LEN..STREAM_HEADER_LEN + seg]);
        swapped.extend_from_slice(&sealed[STREAM_HEADER_LEN + 2 * seg..]);
        assert!(open(&k, "a", &swapped)
            .unwrap_err()
            .contains("segment 0 fails"));
        // Another name, another repository, one flipped bit, a trailing byte.
        assert!(open(&k, "b", &sealed).is_err());
        let other = Arc::new(RepoKeys::derive(&Key::from_bytes([9; 32]), "other"));
        assert!(open(&other, "a", &sealed).is_err());
        for at in [3, 8, 11, STREAM_HEADER_LEN + 5, sealed.len() - 3] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(open(&k, "a", &bad).is_err(), "flip at {at}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(open(&k, "a", &longer).is_err());
    }

    #[test]
    fn mac_envelopes_bind_kind_name_and_content() {
        let k = keys();
        let sealed = mac_seal(&k, ObjectKind::Manifest, "p1", b"{}\n");
        assert_eq!(
            mac_open(&k, ObjectKind::Manifest, "p1", &sealed).unwrap(),
            b"{}\n"
        );
        assert!(mac_open(&k, ObjectKind::Manifest, "p2", &sealed).is_err());
        assert!(mac_open(&k, ObjectKind::PruneRecord, "p1", &sealed).is_err());
        let mut bad = sealed.clone();
        bad[MAC_HEADER_LEN] ^= 1;
        assert!(mac_open(&k, ObjectKind::Manifest, "p1", &bad).is_err());
        let e = mac_open(
            &k,
            ObjectKind::Manifest,
            "p1",
            &b"plain manifest bytes without any MAC at all, long enough"[..],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("carries no MAC"), "{e}");
    }
}
