//! The sending side: `bkimg replicate --to bkimg://HOST:PORT`. One call ships what the
//! standby lacks and returns; a caller that replicates continuously calls it again.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bkimg_format::progress::Progress;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::{LocalDir, StoreRead};
use bkimg_format::{Digest, FormatError};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::protocol::{self as p, Kind, PeerError};
use super::tls::{self, Fingerprint, Identity, Seen};
use crate::throttle::Throttle;
use crate::{RemoteError, ReplicateOptions, ShipReport};

/// Digests per query: a batch is acknowledged before the next is offered, so at most this
/// many chunks are unacknowledged.
const BATCH: usize = 1024;

pub struct ClientConfig {
    /// HOST:PORT of the standby.
    pub address: String,
    pub identity: Identity,
    pub server_fingerprint: Fingerprint,
    /// Further attempts after a broken or failed connection.
    pub retries: u32,
    /// No progress for this long means the connection is dead.
    pub timeout: Duration,
}

/// A protected (encrypted or signed) repository as it is stored, which a ship sends as it
/// is (protocol version 3): the standby holds its points without the key.
pub struct StoredForm {
    pub local: Arc<LocalDir>,
    /// The config file, byte for byte.
    pub config: Vec<u8>,
    pub key_slots: Vec<(String, Vec<u8>)>,
}

impl ClientConfig {
    /// "bkimg://HOST:PORT" → "HOST:PORT".
    pub fn address_of(url: &str) -> Result<String> {
        let rest = url
            .strip_prefix("bkimg://")
            .ok_or_else(|| anyhow!("{url:?} is not a bkimg://HOST:PORT address"))?
            .trim_end_matches('/');
        if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
            anyhow::bail!("{url:?}: give the standby as bkimg://HOST:PORT");
        }
        Ok(rest.to_string())
    }
}

/// Ships the restore points of `src` the standby lacks (with `opts.ids`: those and their
/// ancestors), parents first; retries broken connections `cfg.retries` times with backoff.
///
/// `src` is read through its key; a protected repository also gives its `stored` form,
/// which is what is sent.
pub fn replicate(
    src: &Repository,
    stored: Option<&StoredForm>,
    cfg: &ClientConfig,
    opts: &ReplicateOptions,
    progress: &dyn Progress,
) -> Result<ShipReport> {
    let start = Instant::now();
    let (plan, damaged) = crate::points_to_ship(src, &opts.ids)?;
    if let Some((id, e)) = damaged.into_iter().next() {
        return Err(anyhow::Error::from(e).context(format!(
            "restore point {id} of {} cannot be read",
            src.location()
        )));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let throttle = Throttle::new(opts.bandwidth);
    let mut report = ShipReport::default();
    let mut last = None;
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            let wait = Duration::from_secs((1u64 << (attempt - 1).min(5)).min(30));
            progress.note(&format!(
                "{}: {:#}; retrying in {} s (attempt {} of {})",
                cfg.address,
                last.as_ref().expect("set on failure"),
                wait.as_secs(),
                attempt + 1,
                cfg.retries + 1
            ));
            std::thread::sleep(wait);
        }
        let mut this = ShipReport::default();
        let result = rt.block_on(session(
            src, stored, &plan, cfg, &throttle, progress, &mut this,
        ));
        report.points_sent.extend(this.points_sent.iter().cloned());
        report.chunks_sent += this.chunks_sent;
        report.bytes_sent += this.bytes_sent;
        // What an earlier attempt sent is "present" to a later one: count it once.
        report.chunks_present = this
            .chunks_present
            .saturating_sub(report.chunks_sent - this.chunks_sent);
        report.points_present = this
            .points_present
            .saturating_sub(report.points_sent.len() - this.points_sent.len());
        match result {
            Ok(()) => {
                report.seconds = start.elapsed().as_secs_f64();
                return Ok(report);
            }
            Err(e) => {
                let e = classify(e, cfg);
                if !transient(&e) {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    let last = last.expect("at least one attempt failed");
    Err(RemoteError::Unreachable(format!(
        "standby {}: {last:#}; gave up after {} attempts: run the same command again to resume \
         (what arrived is kept)",
        cfg.address,
        cfg.retries + 1
    ))
    .into())
}

async fn connect(
    cfg: &ClientConfig,
    seen: &Seen,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connect_tls(
        &cfg.address,
        &cfg.identity,
        &cfg.server_fingerprint,
        cfg.timeout,
        seen,
    )
    .await
}

/// TCP, then the TLS handshake pinning `pin`, each bounded by `timeout`.
pub(crate) async fn connect_tls(
    address: &str,
    identity: &Identity,
    pin: &Fingerprint,
    timeout: Duration,
    seen: &Seen,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| p::TimedOut(timeout))?
        .with_context(|| format!("connecting to {address}"))?;
    tcp.set_nodelay(true).ok();
    let config = tls::client_config(identity, pin, seen.clone())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(tls::SERVER_NAME).expect("valid name");
    let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| p::TimedOut(timeout))?
        .context("TLS handshake")?;
    Ok(stream)
}

async fn session(
    src: &Repository,
    stored: Option<&StoredForm>,
    plan: &[Point],
    cfg: &ClientConfig,
    throttle: &Throttle,
    progress: &dyn Progress,
    report: &mut ShipReport,
) -> Result<()> {
    let seen = Seen::default();
    let mut s = connect(cfg, &seen)
        .await
        .map_err(|e| attach_seen(e, &seen))?;
    let t = cfg.timeout;
    let hello = p::Hello {
        protocol: p::PROTOCOL.into(),
        versions: p::VERSIONS.to_vec(),
        software: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
        session: p::SessionKind::Ship,
    };
    p::write_json(&mut s, Kind::Hello, &hello, t).await?;
    p::flush(&mut s, t).await?;
    let welcome: p::Welcome = p::read_frame(&mut s, t)
        .await?
        .expect(Kind::Welcome)?
        .json()?;
    if !p::VERSIONS.contains(&welcome.version) {
        return Err(PeerError::Violation(format!(
            "the standby chose protocol version {} which was not offered",
            welcome.version
        ))
        .into());
    }
    if let Some(form) = stored {
        if welcome.version < p::PROTECTED_VERSION {
            return Err(FormatError::unsupported(
                format!("standby {}", cfg.address),
                format!(
                    "encrypted and signed repositories: it runs {}, which speaks standby \
                     protocol version {}; upgrade bkimg on the standby (nothing was sent)",
                    welcome.software, welcome.version
                ),
            )
            .into());
        }
        let msg = p::RepoProtection::new(&form.config, &form.key_slots);
        p::write_json(&mut s, Kind::Protection, &msg, t).await?;
        p::flush(&mut s, t).await?;
        p::read_frame(&mut s, t).await?.expect(Kind::ProtectionOk)?;
    }
    let raw: &dyn StoreRead = match stored {
        Some(form) => form.local.as_ref(),
        None => src.store(),
    };
    let there: HashMap<String, String> = welcome
        .points
        .into_iter()
        .map(|p| (p.id, p.manifest_sha256))
        .collect();
    for point in plan {
        let id = &point.manifest.id;
        // What both sides compare is the SHA-256 of the manifest file as stored: a
        // protected point's is its envelope, which the standby can hash without the key.
        let sha = match stored {
            Some(_) => Digest::of_bytes(&raw.read_manifest(id)?).to_hex(),
            None => point.manifest_sha256.to_hex(),
        };
        match there.get(id) {
            Some(theirs) if *theirs == sha => {
                report.points_present += 1;
                continue;
            }
            Some(_) => {
                return Err(PeerError::Reported {
                    code: "conflict".into(),
                    message: format!(
                        "the standby holds a different restore point named {id}: it was not \
                         replicated from this repository; use another --repo on the standby"
                    ),
                }
                .into())
            }
            None => {}
        }
        progress.note(&format!("sending restore point {id}"));
        let protected = stored.is_some();
        send_point(
            &mut s, src, raw, protected, point, &sha, t, throttle, progress, report,
        )
        .await?;
        report.points_sent.push(id.clone());
    }
    p::write_frame(&mut s, Kind::Bye, &[], t).await?;
    p::flush(&mut s, t).await?;
    // Close the TLS session cleanly; the standby has committed everything already.
    let _ = tokio::time::timeout(t, tokio::io::AsyncWriteExt::shutdown(&mut s)).await;
    Ok(())
}

/// Sends one point: its chunks and indexes are enumerated through `src` (the key) and
/// sent as `raw` stores them.
#[allow(clippy::too_many_arguments)]
async fn send_point<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    src: &Repository,
    raw: &dyn StoreRead,
    protected: bool,
    point: &Point,
    stored_sha256: &str,
    t: Duration,
    throttle: &Throttle,
    progress: &dyn Progress,
    report: &mut ShipReport,
) -> Result<()> {
    let m = &point.manifest;
    // For the bar: what the point stored new is about what a standby holding its parent
    // lacks (a first point sends more: the bar then runs past its end).
    let estimate: u64 = m
        .disks
        .iter()
        .flat_map(|d| &d.volumes)
        .map(|v| match &v.content {
            bkimg_format::manifest::Content::Data {
                bytes_stored_new, ..
            } => *bytes_stored_new,
            _ => 0,
        })
        .sum();
    progress.begin("send", estimate);
    let indexes: Vec<Digest> = {
        let mut v: Vec<Digest> = Vec::new();
        for (_, _, idx) in m.indexes() {
            if let Some(i) = idx {
                if !v.contains(&i) {
                    v.push(i);
                }
            }
        }
        v
    };
    let parent_pruned = match &m.parent {
        // Checked through the key, sent as stored.
        Some(link) => match src.pruned_link(link)? {
            Some(_) if protected => raw.read_prune_record(&link.id)?.map(hex::encode),
            Some(end) => Some(hex::encode(end.bytes)),
            None => None,
        },
        None => None,
    };
    let begin = p::Begin {
        id: m.id.clone(),
        manifest_sha256: stored_sha256.to_string(),
        indexes: indexes.iter().map(|d| d.to_hex()).collect(),
        parent_pruned,
        parent: match &m.parent {
            Some(link) if protected => Some(p::ParentLink {
                id: link.id.clone(),
                stored_sha256: match raw.read_manifest(&link.id) {
                    Ok(bytes) => Some(Digest::of_bytes(&bytes).to_hex()),
                    Err(FormatError::Missing { .. }) => None,
                    Err(e) => return Err(e.into()),
                },
            }),
            _ => None,
        },
    };
    p::write_json(s, Kind::Begin, &begin, t).await?;
    p::flush(s, t).await?;
    let plan: p::Plan = p::read_frame(s, t).await?.expect(Kind::Plan)?.json()?;
    let missing: Vec<Digest> = plan
        .missing_indexes
        .iter()
        .map(|h| {
            Digest::from_hex(h)
                .filter(|d| indexes.contains(d))
                .ok_or_else(|| anyhow!(PeerError::Violation(format!("plan names index {h:?}"))))
        })
        .collect::<Result<_>>()?;

    // Chunks first, so that every index arrives after the chunks it names.
    let mut offered: HashSet<Digest> = HashSet::new();
    let mut batch = Vec::new();
    let mut pending: Vec<Digest> = Vec::new();
    let mut blob = Vec::new();
    for idx in &missing {
        let mut entries = src.index(idx)?;
        loop {
            entries.next_batch(8192, &mut batch)?;
            if batch.is_empty() {
                break;
            }
            for d in batch.iter() {
                if !d.is_hole() && offered.insert(*d) {
                    pending.push(*d);
                    if pending.len() == BATCH {
                        send_batch(
                            s, src, raw, protected, &pending, t, throttle, progress, report,
                            &mut blob,
                        )
                        .await?;
                        pending.clear();
                    }
                }
            }
        }
    }
    if !pending.is_empty() {
        send_batch(
            s, src, raw, protected, &pending, t, throttle, progress, report, &mut blob,
        )
        .await?;
    }

    let mut buf = vec![0u8; p::INDEX_PART_MAX];
    for idx in &missing {
        let mut input = raw.open_index(idx)?;
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut input, &mut buf)
                .with_context(|| format!("reading volume index {idx}"))?;
            if n == 0 {
                break;
            }
            throttle.take(n as u64).await;
            p::write_frame(
                s,
                Kind::IndexPart,
                &[&idx.0, &offset.to_le_bytes(), &buf[..n]],
                t,
            )
            .await?;
            offset += n as u64;
            report.bytes_sent += n as u64;
        }
        p::write_frame(s, Kind::IndexEnd, &[&idx.0], t).await?;
        p::flush(s, t).await?;
        p::read_frame(s, t).await?.expect(Kind::IndexOk)?;
    }

    let bytes = raw.read_manifest(&m.id)?;
    p::write_frame(s, Kind::Commit, &[&bytes], t).await?;
    p::flush(s, t).await?;
    report.bytes_sent += bytes.len() as u64;
    let c: p::Committed = p::read_frame(s, t).await?.expect(Kind::Committed)?.json()?;
    if c.id != m.id {
        return Err(PeerError::Violation(format!("committed {:?}, not {:?}", c.id, m.id)).into());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn send_batch<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    src: &Repository,
    raw: &dyn StoreRead,
    protected: bool,
    digests: &[Digest],
    t: Duration,
    throttle: &Throttle,
    progress: &dyn Progress,
    report: &mut ShipReport,
    blob: &mut Vec<u8>,
) -> Result<()> {
    p::write_frame(s, Kind::Query, &[&p::pack_digests(digests)], t).await?;
    p::flush(s, t).await?;
    let lacks = p::read_frame(s, t).await?.expect(Kind::Lacks)?;
    if lacks.body.len() != digests.len() {
        return Err(PeerError::Violation("answer length differs from the query".into()).into());
    }
    for (d, &lack) in digests.iter().zip(&lacks.body) {
        if lack == 0 {
            report.chunks_present += 1;
            continue;
        }
        if protected {
            // Sent as stored, which a standby without the key cannot check: opened
            // through the key first, so that a damaged chunk is reported here.
            src.store().read_chunk(d, blob)?;
        }
        raw.read_chunk(d, blob)?;
        throttle.take(blob.len() as u64).await;
        p::write_frame(s, Kind::Chunk, &[&d.0, blob], t).await?;
        report.chunks_sent += 1;
        report.bytes_sent += blob.len() as u64;
        progress.advance(blob.len() as u64);
    }
    p::write_frame(s, Kind::BatchEnd, &[], t).await?;
    p::flush(s, t).await?;
    let ok = p::read_frame(s, t).await?;
    if ok.kind == Kind::Error {
        let e: p::ErrorMsg = ok.json()?;
        if e.code == "damaged" {
            // TLS guarantees what we sent is what was read: the source itself is damaged.
            return Err(FormatError::corrupt(
                format!("a chunk in {}", src.location()),
                format!("the standby refused it: {}", e.message),
            )
            .into());
        }
        return Err(PeerError::Reported {
            code: e.code,
            message: e.message,
        }
        .into());
    }
    ok.expect(Kind::BatchOk)?;
    Ok(())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Remembers which certificate the server showed, for the error message.
pub(crate) fn attach_seen(e: anyhow::Error, seen: &Seen) -> anyhow::Error {
    match seen.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        Some(fp) => e.context(format!("the standby presented certificate {fp}")),
        None => e,
    }
}

/// Turns refusals into [`RemoteError::Denied`] with a message saying what to do.
fn classify(e: anyhow::Error, cfg: &ClientConfig) -> anyhow::Error {
    classify_refusal(
        e,
        &cfg.address,
        &cfg.identity.fingerprint(),
        &cfg.server_fingerprint,
        "--allow",
    )
}

/// Turns TLS refusals (either side's) and a standby's `denied` into
/// [`RemoteError::Denied`]: `own` is this host's certificate, `pinned` the one expected of
/// the standby, `allow` the serve option that would let `own` in.
pub(crate) fn classify_refusal(
    e: anyhow::Error,
    address: &str,
    own: &Fingerprint,
    pinned: &Fingerprint,
    allow: &str,
) -> anyhow::Error {
    for cause in e.chain() {
        if let Some(PeerError::Reported { code, message }) = cause.downcast_ref::<PeerError>() {
            if code == "denied" {
                return RemoteError::Denied(format!(
                    "standby {address} refused (certificate {own}): {message}"
                ))
                .into();
            }
        }
        let tls_err = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| cause.downcast_ref::<rustls::Error>());
        let Some(tls_err) = tls_err else { continue };
        use rustls::AlertDescription as A;
        match tls_err {
            rustls::Error::InvalidCertificate(_) => {
                let shown = e
                    .chain()
                    .find_map(|c| {
                        let t = c.to_string();
                        t.strip_prefix("the standby presented certificate ")
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| "an unexpected certificate".into());
                return RemoteError::Denied(format!(
                    "standby {address} presented certificate {shown}, not the pinned {pinned}: \
                     this is not the standby you configured (or its key was replaced); check \
                     --server-fingerprint against `bkimg standby fingerprint` on the standby"
                ))
                .into();
            }
            rustls::Error::AlertReceived(
                A::AccessDenied
                | A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::DecryptError,
            ) => {
                return RemoteError::Denied(format!(
                    "standby {address} refused our key (certificate {own}): allow it there \
                     with {allow} {own}"
                ))
                .into();
            }
            _ => {}
        }
    }
    e
}

/// Whether another attempt may succeed: network trouble yes; refusals, damage and
/// protocol violations no.
pub(crate) fn transient(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if cause.downcast_ref::<RemoteError>().is_some()
            || cause.downcast_ref::<FormatError>().is_some()
        {
            return false;
        }
        if let Some(pe) = cause.downcast_ref::<PeerError>() {
            return matches!(pe, PeerError::Reported { code, .. } if code == "busy");
        }
        if cause.downcast_ref::<p::TimedOut>().is_some()
            || cause.downcast_ref::<std::io::Error>().is_some()
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            ClientConfig::address_of("bkimg://h:7070").unwrap(),
            "h:7070"
        );
        assert_eq!(
            ClientConfig::address_of("bkimg://[::1]:7070/").unwrap(),
            "[::1]:7070"
        );
        assert!(ClientConfig::address_of("bkimg://h").is_err());
        assert!(ClientConfig::address_of("s3://h:1").is_err());
    }
}
