//! The standby wire protocol (spec/standby-protocol.md is normative): frames of
//! `u32 length | u8 type | body` inside TLS 1.3. Every length is checked against the
//! limit of its frame type before anything is allocated.
//!
//! Version 1 has ship sessions only; version 2 adds read sessions (frames 17-27), which
//! serve the objects of the standby's repository to a reader that checks them itself;
//! version 3 carries encrypted and signed repositories (frames 28-31): their config and key
//! slots, and objects stored as they are sealed.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bkimg_format::Digest;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol versions this build speaks.
pub const VERSIONS: &[u32] = &[1, 2, 3];
/// The first version with read sessions.
pub const READ_VERSION: u32 = 2;
/// The first version that carries protected (encrypted or signed) repositories.
pub const PROTECTED_VERSION: u32 = 3;
pub const PROTOCOL: &str = "bkimg-standby";

/// Digests per chunk query.
pub const QUERY_MAX: usize = 4096;
/// Bytes of index data per frame.
pub const INDEX_PART_MAX: usize = 1 << 20;
/// Largest frame of any type: a chunk frame (digest + largest stored blob).
pub const FRAME_MAX: u32 = 32 + BLOB_MAX;
/// Largest JSON frame.
pub const JSON_MAX: u32 = 4 << 20;
/// Largest stored chunk blob: header and payload, in an envelope when the repository is
/// encrypted (spec/format.md §18.4).
pub const BLOB_MAX: u32 = bkimg_format::chunk::HEADER_LEN as u32
    + bkimg_format::MAX_CHUNK_SIZE
    + bkimg_format::crypto::ENVELOPE_OVERHEAD as u32;
/// Largest manifest or prune record file (a sealed document).
pub const SEALED_MAX: u32 = bkimg_format::sealed::MAX_BODY_LEN as u32 + 64;
/// Largest volume index object: header and one entry per chunk of the largest volume in
/// the smallest chunks, and, encrypted, the segmented envelope around them (a header and
/// 28 bytes per 1 MiB segment, spec/format.md §18.4.1).
pub const INDEX_MAX: u64 = INDEX_PLAIN_MAX
    + bkimg_format::protect::STREAM_HEADER_LEN as u64
    + (INDEX_PLAIN_MAX / bkimg_format::protect::SEGMENT_LEN as u64 + 1)
        * (bkimg_format::crypto::NONCE_LEN + bkimg_format::crypto::TAG_LEN) as u64;
const INDEX_PLAIN_MAX: u64 = bkimg_format::index::HEADER_LEN as u64
    + (bkimg_format::index::MAX_VOLUME_SIZE / bkimg_format::MIN_CHUNK_SIZE as u64)
        * bkimg_format::index::ENTRY_LEN as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Error = 3,
    Begin = 4,
    Plan = 5,
    Query = 6,
    Lacks = 7,
    Chunk = 8,
    BatchEnd = 9,
    BatchOk = 10,
    IndexPart = 11,
    IndexEnd = 12,
    IndexOk = 13,
    Commit = 14,
    Committed = 15,
    Bye = 16,
    // Version 2: read sessions.
    List = 17,
    Listing = 18,
    GetManifest = 19,
    ManifestData = 20,
    GetIndex = 21,
    IndexData = 22,
    GetChunk = 23,
    ChunkData = 24,
    GetPruneRecord = 25,
    PruneRecordData = 26,
    NotFound = 27,
    // Version 3: protected repositories.
    Protection = 28,
    ProtectionOk = 29,
    GetConfig = 30,
    ConfigData = 31,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Error,
            4 => Begin,
            5 => Plan,
            6 => Query,
            7 => Lacks,
            8 => Chunk,
            9 => BatchEnd,
            10 => BatchOk,
            11 => IndexPart,
            12 => IndexEnd,
            13 => IndexOk,
            14 => Commit,
            15 => Committed,
            16 => Bye,
            17 => List,
            18 => Listing,
            19 => GetManifest,
            20 => ManifestData,
            21 => GetIndex,
            22 => IndexData,
            23 => GetChunk,
            24 => ChunkData,
            25 => GetPruneRecord,
            26 => PruneRecordData,
            27 => NotFound,
            28 => Protection,
            29 => ProtectionOk,
            30 => GetConfig,
            31 => ConfigData,
            _ => return None,
        })
    }

    /// Largest body a frame of this type may have.
    pub fn max_body(self) -> u32 {
        use Kind::*;
        match self {
            Hello | Welcome | Error | Begin | Plan | BatchOk | Committed | Listing | Protection
            | ConfigData => JSON_MAX,
            Query => (QUERY_MAX * 32) as u32,
            Lacks => QUERY_MAX as u32,
            Chunk => FRAME_MAX,
            IndexPart => (32 + 8 + INDEX_PART_MAX) as u32,
            IndexEnd | GetChunk => 32,
            Commit | ManifestData | PruneRecordData => SEALED_MAX,
            BatchEnd | IndexOk | Bye | List | NotFound | ProtectionOk | GetConfig => 0,
            GetManifest | GetPruneRecord => bkimg_format::manifest::MAX_ID_LEN as u32,
            GetIndex => 32 + 8,
            IndexData => (8 + INDEX_PART_MAX) as u32,
            ChunkData => BLOB_MAX,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: String,
    pub versions: Vec<u32>,
    pub software: String,
    /// What the client means to do (version 2; absent: ship).
    #[serde(default)]
    pub session: SessionKind,
}

/// The two kinds of session: a ship session writes restore points to the standby, a read
/// session (version 2) only reads its repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    #[default]
    Ship,
    Read,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PointRef {
    pub id: String,
    pub manifest_sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub software: String,
    pub points: Vec<PointRef>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// "unsupported", "violation", "damaged", "incomplete", "conflict", "internal", "busy",
    /// and (version 2) "denied".
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Begin {
    pub id: String,
    pub manifest_sha256: String,
    pub indexes: Vec<String>,
    /// The prune record (hex of its bytes) of the point's parent, when the sender pruned
    /// that parent: the standby stores it if it lacks the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_pruned: Option<String>,
    /// The point's parent (version 3, sent for a protected repository, whose manifest a
    /// standby without the key cannot read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// A protected point's parent, as the client holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ParentLink {
    pub id: String,
    /// SHA-256 of the parent's manifest file as stored (its envelope), when the client
    /// still holds it (absent: pruned there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_sha256: Option<String>,
}

/// A repository's config file and its key slots (id and file), as they are stored.
pub type ConfigAndSlots = (Vec<u8>, Vec<(String, Vec<u8>)>);

/// A protected repository's config and key slots (version 3): what a Protection frame
/// sends to the standby and a ConfigData frame sends to a reader.
#[derive(Debug, Serialize, Deserialize)]
pub struct RepoProtection {
    /// The config file, byte for byte, in lowercase hex.
    pub config: String,
    pub key_slots: Vec<KeySlot>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeySlot {
    pub id: String,
    /// The slot file, byte for byte, in lowercase hex.
    pub bytes: String,
}

impl RepoProtection {
    pub fn new(config: &[u8], slots: &[(String, Vec<u8>)]) -> RepoProtection {
        RepoProtection {
            config: hex::encode(config),
            key_slots: slots
                .iter()
                .map(|(id, bytes)| KeySlot {
                    id: id.clone(),
                    bytes: hex::encode(bytes),
                })
                .collect(),
        }
    }

    /// The config bytes and the key slots, checked to be hex and the slots' ids valid.
    pub fn decode(&self) -> Result<ConfigAndSlots> {
        let bad = |what: &str| anyhow!(PeerError::Violation(format!("{what} is not hex")));
        let config = hex::decode(&self.config).map_err(|_| bad("the config"))?;
        let mut slots = Vec::new();
        for s in &self.key_slots {
            if !bkimg_format::keys::valid_slot_id(&s.id) {
                bail!(PeerError::Violation(format!("key slot id {:?}", s.id)));
            }
            slots.push((
                s.id.clone(),
                hex::decode(&s.bytes).map_err(|_| bad("a key slot"))?,
            ));
        }
        Ok((config, slots))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Plan {
    pub missing_indexes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BatchOk {
    pub stored: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Committed {
    pub id: String,
}

/// The answer to List: the ids of the restore points the standby holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    pub ids: Vec<String>,
}

/// A GetIndex request: the index and the byte offset to read from.
pub fn get_index(id: &Digest, offset: u64) -> [u8; 40] {
    let mut body = [0u8; 40];
    body[..32].copy_from_slice(&id.0);
    body[32..].copy_from_slice(&offset.to_le_bytes());
    body
}

pub fn parse_get_index(body: &[u8]) -> Result<(Digest, u64)> {
    if body.len() != 40 {
        bail!(PeerError::Violation(format!(
            "GetIndex of {} bytes, not 40",
            body.len()
        )));
    }
    let offset = u64::from_le_bytes(body[32..].try_into().expect("8 bytes"));
    Ok((digest_at(body, 0)?, offset))
}

/// An IndexData answer to a request for `offset`: the index's whole length and its bytes
/// from `offset`, checked to be exactly what such an answer must carry (no more than a
/// part, and a short part only at the end).
pub fn parse_index_data(body: &[u8], offset: u64) -> Result<(u64, &[u8])> {
    if body.len() < 8 {
        bail!(PeerError::Violation(
            "IndexData shorter than its head".into()
        ));
    }
    let total = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let data = &body[8..];
    if total > INDEX_MAX {
        bail!(PeerError::Violation(format!(
            "an index of {total} bytes is larger than any index can be"
        )));
    }
    let expected = total.saturating_sub(offset).min(INDEX_PART_MAX as u64);
    if offset > total || data.len() as u64 != expected {
        bail!(PeerError::Violation(format!(
            "IndexData of {} bytes at offset {offset} of a {total}-byte index",
            data.len()
        )));
    }
    Ok((total, data))
}

/// A restore-point id in a GetManifest or GetPruneRecord request.
pub fn parse_id(body: &[u8]) -> Result<String> {
    String::from_utf8(body.to_vec())
        .map_err(|_| PeerError::Violation("an id that is not UTF-8".into()).into())
}

/// The peer said something the protocol does not allow, or reported an error.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the standby reported: {message} ({code})")]
    Reported { code: String, message: String },
    #[error("protocol violation: {0}")]
    Violation(String),
}

/// One received frame.
pub struct Frame {
    pub kind: Kind,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| PeerError::Violation(format!("bad {:?} message: {e}", self.kind)).into())
    }

    /// Fails unless the frame is `kind`; an Error frame becomes [`PeerError::Reported`].
    pub fn expect(self, kind: Kind) -> Result<Frame> {
        if self.kind == kind {
            return Ok(self);
        }
        if self.kind == Kind::Error {
            let e: ErrorMsg = self.json()?;
            return Err(PeerError::Reported {
                code: e.code,
                message: e.message,
            }
            .into());
        }
        Err(PeerError::Violation(format!("expected {kind:?}, got {:?}", self.kind)).into())
    }
}

/// Reads one frame; `idle` bounds the wait for it to start and for each part of it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, idle: Duration) -> Result<Frame> {
    let mut head = [0u8; 5];
    timed(idle, r.read_exact(&mut head)).await?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let kind = Kind::from_u8(head[4])
        .ok_or_else(|| PeerError::Violation(format!("unknown frame type {}", head[4])))?;
    if len > kind.max_body() {
        return Err(PeerError::Violation(format!(
            "{kind:?} frame of {len} bytes is over its limit of {}",
            kind.max_body()
        ))
        .into());
    }
    let mut body = vec![0u8; len as usize];
    timed(idle, r.read_exact(&mut body)).await?;
    Ok(Frame { kind, body })
}

/// Writes one frame made of `parts`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    parts: &[&[u8]],
    idle: Duration,
) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > kind.max_body() as usize {
        bail!("internal: {kind:?} frame of {len} bytes over its limit");
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind as u8;
    timed(idle, w.write_all(&head)).await?;
    for p in parts {
        timed(idle, w.write_all(p)).await?;
    }
    Ok(())
}

pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: Kind,
    value: &T,
    idle: Duration,
) -> Result<()> {
    let body = serde_json::to_vec(value).expect("messages serialize");
    write_frame(w, kind, &[&body], idle).await
}

pub async fn flush<W: AsyncWrite + Unpin>(w: &mut W, idle: Duration) -> Result<()> {
    timed(idle, w.flush()).await
}

/// Digests packed back to back (Query frames).
pub fn pack_digests(ds: &[Digest]) -> Vec<u8> {
    ds.iter().flat_map(|d| d.0).collect()
}

pub fn unpack_digests(body: &[u8]) -> Result<Vec<Digest>> {
    if !body.len().is_multiple_of(32) {
        bail!(PeerError::Violation(
            "digest list not a multiple of 32 bytes".into()
        ));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| Digest(c.try_into().expect("32 bytes")))
        .collect())
}

pub fn digest_at(body: &[u8], at: usize) -> Result<Digest> {
    body.get(at..at + 32)
        .map(|c| Digest(c.try_into().expect("32 bytes")))
        .ok_or_else(|| anyhow!(PeerError::Violation("frame too short for a digest".into())))
}

/// A dead peer or link shows up as a timeout.
#[derive(Debug, thiserror::Error)]
#[error("no progress for {0:?}: the connection seems dead")]
pub struct TimedOut(pub Duration);

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(TimedOut(limit).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_refused_before_allocating() {
        let t = Duration::from_secs(1);
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Query, &[&[7u8; 64]], t)
            .await
            .unwrap();
        let f = read_frame(&mut buf.as_slice(), t).await.unwrap();
        assert_eq!(f.kind, Kind::Query);
        assert_eq!(unpack_digests(&f.body).unwrap().len(), 2);

        // A Bye frame claiming 4 GiB: refused on its header alone.
        let bad = [0xff, 0xff, 0xff, 0xff, Kind::Bye as u8];
        let e = read_frame(&mut bad.as_slice(), t).await.err().unwrap();
        assert!(e.to_string().contains("over its limit"), "{e}");
        // Unknown type.
        let bad = [0, 0, 0, 0, 200];
        assert!(read_frame(&mut bad.as_slice(), t).await.is_err());
        // Truncated body.
        let bad = [10, 0, 0, 0, Kind::Query as u8, 1, 2];
        assert!(read_frame(&mut bad.as_slice(), t).await.is_err());
    }

    /// A frame head claiming `len` bytes of `kind`, with no body.
    fn head(kind: u8, len: u32) -> Vec<u8> {
        let mut h = len.to_le_bytes().to_vec();
        h.push(kind);
        h
    }

    #[tokio::test]
    async fn read_frames_round_trip() {
        let t = Duration::from_secs(1);
        let id = Digest([9u8; 32]);
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::List, &[], t).await.unwrap();
        let listing = Listing {
            ids: vec!["a".into(), "b".into()],
        };
        write_json(&mut buf, Kind::Listing, &listing, t)
            .await
            .unwrap();
        write_frame(&mut buf, Kind::GetManifest, &[b"point-1"], t)
            .await
            .unwrap();
        write_frame(&mut buf, Kind::GetIndex, &[&get_index(&id, 1 << 20)], t)
            .await
            .unwrap();
        let part = vec![7u8; INDEX_PART_MAX];
        let total = (INDEX_PART_MAX as u64 * 2 + 5).to_le_bytes();
        write_frame(&mut buf, Kind::IndexData, &[&total, &part], t)
            .await
            .unwrap();
        write_frame(&mut buf, Kind::GetChunk, &[&id.0], t)
            .await
            .unwrap();
        let blob = vec![1u8; BLOB_MAX as usize];
        write_frame(&mut buf, Kind::ChunkData, &[&blob], t)
            .await
            .unwrap();
        write_frame(&mut buf, Kind::NotFound, &[], t).await.unwrap();

        let mut r = buf.as_slice();
        assert_eq!(read_frame(&mut r, t).await.unwrap().kind, Kind::List);
        let l: Listing = read_frame(&mut r, t).await.unwrap().json().unwrap();
        assert_eq!(l.ids, ["a", "b"]);
        let f = read_frame(&mut r, t).await.unwrap();
        assert_eq!(f.kind, Kind::GetManifest);
        assert_eq!(parse_id(&f.body).unwrap(), "point-1");
        let f = read_frame(&mut r, t).await.unwrap();
        assert_eq!(parse_get_index(&f.body).unwrap(), (id, 1 << 20));
        let f = read_frame(&mut r, t).await.unwrap();
        let (n, data) = parse_index_data(&f.body, 1 << 20).unwrap();
        assert_eq!(
            (n, data.len()),
            (INDEX_PART_MAX as u64 * 2 + 5, INDEX_PART_MAX)
        );
        let f = read_frame(&mut r, t).await.unwrap();
        assert_eq!(digest_at(&f.body, 0).unwrap(), id);
        let f = read_frame(&mut r, t).await.unwrap();
        assert_eq!((f.kind, f.body.len()), (Kind::ChunkData, BLOB_MAX as usize));
        let f = read_frame(&mut r, t).await.unwrap();
        assert_eq!((f.kind, f.body.len()), (Kind::NotFound, 0));
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn read_frames_over_their_limits_are_refused_on_the_head() {
        let t = Duration::from_secs(1);
        for (kind, len) in [
            (Kind::List, 1),
            (Kind::NotFound, 1),
            (Kind::GetChunk, 33),
            (Kind::GetIndex, 41),
            (Kind::GetManifest, 65),
            (Kind::GetPruneRecord, 65),
            (Kind::IndexData, 8 + INDEX_PART_MAX as u32 + 1),
            (Kind::ChunkData, BLOB_MAX + 1),
            (Kind::ManifestData, SEALED_MAX + 1),
            (Kind::PruneRecordData, SEALED_MAX + 1),
            (Kind::Listing, JSON_MAX + 1),
        ] {
            // No body follows: refusing on the head alone is what is tested.
            let h = head(kind as u8, len);
            let e = read_frame(&mut h.as_slice(), t).await.err().unwrap();
            assert!(e.to_string().contains("over its limit"), "{kind:?}: {e}");
            // The writer refuses to send it too.
            let body = vec![0u8; len as usize];
            assert!(write_frame(&mut Vec::new(), kind, &[&body], t)
                .await
                .is_err());
        }
        // The first type after version 3's.
        let h = head(32, 0);
        let e = read_frame(&mut h.as_slice(), t).await.err().unwrap();
        assert!(e.to_string().contains("unknown frame type 32"), "{e}");
    }

    #[test]
    fn index_answers_must_carry_exactly_their_part() {
        let total = INDEX_PART_MAX as u64 + 100;
        let answer = |total: u64, n: usize| {
            let mut b = total.to_le_bytes().to_vec();
            b.resize(8 + n, 3);
            b
        };
        assert!(parse_index_data(&answer(total, INDEX_PART_MAX), 0).is_ok());
        assert!(parse_index_data(&answer(total, 100), INDEX_PART_MAX as u64).is_ok());
        // At the end: empty.
        assert!(parse_index_data(&answer(total, 0), total).is_ok());
        // Short in the middle, long at the end, past the end, no head, absurd length.
        assert!(parse_index_data(&answer(total, 10), 0).is_err());
        assert!(parse_index_data(&answer(total, 101), INDEX_PART_MAX as u64).is_err());
        assert!(parse_index_data(&answer(total, 0), total + 1).is_err());
        assert!(parse_index_data(&[1, 2, 3], 0).is_err());
        assert!(parse_index_data(&answer(INDEX_MAX + 1, 0), INDEX_MAX + 1).is_err());
        assert!(parse_get_index(&[0u8; 39]).is_err());
        assert!(parse_id(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn hello_without_a_session_kind_is_a_ship_session() {
        // What a version-1 client sends.
        let h: Hello =
            serde_json::from_str(r#"{"protocol":"bkimg-standby","versions":[1],"software":"x"}"#)
                .unwrap();
        assert_eq!(h.session, SessionKind::Ship);
        let h: Hello = serde_json::from_str(
            r#"{"protocol":"bkimg-standby","versions":[1,2],"software":"x","session":"read","later":1}"#,
        )
        .unwrap();
        assert_eq!(h.session, SessionKind::Read);
    }
}
