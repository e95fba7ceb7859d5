//! The standby wire protocol (spec/standby-protocol.md is normative): frames of
//! `u32 length | u8 type | body` inside TLS 1.3. Every length is checked against the
//! limit of its frame type before anything is allocated.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bkimg_format::Digest;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol versions this build speaks.
pub const VERSIONS: &[u32] = &[1];
pub const PROTOCOL: &str = "bkimg-standby";

/// Digests per chunk query.
pub const QUERY_MAX: usize = 4096;
/// Bytes of index data per frame.
pub const INDEX_PART_MAX: usize = 1 << 20;
/// Largest frame of any type: a chunk frame (digest + largest blob) with room to spare.
pub const FRAME_MAX: u32 =
    32 + bkimg_format::chunk::HEADER_LEN as u32 + bkimg_format::MAX_CHUNK_SIZE;
/// Largest JSON frame.
pub const JSON_MAX: u32 = 4 << 20;

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
            _ => return None,
        })
    }

    /// Largest body a frame of this type may have.
    pub fn max_body(self) -> u32 {
        use Kind::*;
        match self {
            Hello | Welcome | Error | Begin | Plan | BatchOk | Committed => JSON_MAX,
            Query => (QUERY_MAX * 32) as u32,
            Lacks => QUERY_MAX as u32,
            Chunk => FRAME_MAX,
            IndexPart => (32 + 8 + INDEX_PART_MAX) as u32,
            IndexEnd => 32,
            Commit => bkimg_format::sealed::MAX_BODY_LEN as u32 + 64,
            BatchEnd | IndexOk | Bye => 0,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: String,
    pub versions: Vec<u32>,
    pub software: String,
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
    /// "unsupported", "damaged", "conflict", "refused", "internal".
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
}
