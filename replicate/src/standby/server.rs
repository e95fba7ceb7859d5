//! The receiving side: `bkimg standby serve`. Nothing received is trusted: every chunk is
//! decoded and checked against its digest before it is stored, every index is read whole
//! (its entries digest checked) and every chunk it names found before it is stored, and a
//! manifest is committed only after the whole point and its digest-chain link are checked.
//! Writes go through [`LocalDir`], which is crash-safe: a broken session leaves only
//! complete objects, which the next session skips.
//!
//! Read sessions (protocol version 2) serve stored objects as they are, for readers that
//! check them themselves; they run alongside ship sessions and each other, and hold the
//! repository's shared lock like ship sessions, so a prune waits for them. Keys allowed
//! with `--allow-reader` may open read sessions only.

use bkimg_format::time::now_rfc3339;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bkimg_format::crypto::{check_envelope, ObjectKind, ENVELOPE_OVERHEAD, NONCE_LEN, TAG_LEN};
use bkimg_format::index::{self, EntryReader, IndexHeader};
use bkimg_format::keys::{Mode, Slot};
use bkimg_format::manifest::Manifest;
use bkimg_format::protect::{check_stream_header, mac_strip, Protection, STREAM_HEADER_LEN};
use bkimg_format::record::PruneRecord;
use bkimg_format::repo::Repository;
use bkimg_format::store::local::{parse_config, RepoConfig};
use bkimg_format::store::{LocalDir, Protected, StoreMaintain, StoreRead, StoreWrite};
use bkimg_format::{chunk, Digest, FormatError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::protocol::{self as p, Kind, PeerError};
use super::replica::{Opener, Outcome, Replica, ReplicaSpec};
use super::tls::{self, Fingerprint, Identity, Seen};

/// Chunks being checked and stored at once in a session.
const CHUNK_WORKERS: usize = 4;

pub struct ServeConfig {
    pub listen: String,
    pub repo: PathBuf,
    /// Replicas kept equal to the latest point, one per disk (empty: none).
    pub replicas: Vec<ReplicaSpec>,
    pub identity: Identity,
    /// Client keys that may ship restore points (and read).
    pub allowed: BTreeSet<Fingerprint>,
    /// Client keys that may only read (`--allow-reader`).
    pub readers: BTreeSet<Fingerprint>,
    /// A peer silent for this long is dropped.
    pub timeout: Duration,
    /// How replicas read a protected repository (through its key); `None`: the standby
    /// has no key, and keeps no replica of a protected repository.
    pub open: Option<Opener>,
}

/// One line on stderr per event (a service manager adds the time).
pub fn log(line: &str) {
    eprintln!("bkimg standby: {line}");
}

struct Ctx {
    cfg: ServeConfig,
    /// Every key that may connect: the shippers and the readers.
    allowed: Arc<BTreeSet<Fingerprint>>,
    /// One session writes to the repository at a time.
    writer: tokio::sync::Mutex<()>,
    /// Wakes the replica thread after a commit.
    applier: Mutex<Option<mpsc::Sender<()>>>,
}

/// Runs until killed. With a replica, an apply interrupted earlier is finished first.
pub fn serve(cfg: ServeConfig) -> Result<()> {
    let (repo, config) = LocalDir::open_or_create_any(&cfg.repo, &new_id(), &now_rfc3339())?;
    drop(repo);
    if config.encryption.is_some() && !cfg.replicas.is_empty() && cfg.open.is_none() {
        return Err(FormatError::Denied(format!(
            "repository {} is encrypted or signed, and a replica (--replica) is applied from \
             its restore points through its key: give the standby the key \
             (--key-file or --password-file), or run it without --replica",
            cfg.repo.display()
        ))
        .into());
    }
    let applier = if cfg.replicas.is_empty() {
        None
    } else {
        let mut r = Replica::new(&cfg.repo, cfg.replicas.clone())?;
        if let Some(open) = &cfg.open {
            r = r.with_opener(open.clone());
        }
        // Before anything else: a replica left half-applied is finished.
        if let Some(rep) = r.finish_interrupted()? {
            log(&format!(
                "finished the interrupted apply: {}",
                rep.summary()
            ));
        }
        let (tx, rx) = mpsc::channel::<()>();
        let _ = tx.send(());
        std::thread::Builder::new()
            .name("replica".into())
            .spawn(move || replica_loop(r, rx))
            .context("starting the replica thread")?;
        Some(tx)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let ctx = Arc::new(Ctx {
        allowed: Arc::new(cfg.allowed.union(&cfg.readers).cloned().collect()),
        cfg,
        writer: tokio::sync::Mutex::new(()),
        applier: Mutex::new(applier),
    });
    rt.block_on(accept_loop(ctx))
}

fn replica_loop(r: Replica, rx: mpsc::Receiver<()>) {
    let mut said_promoted = false;
    loop {
        // Woken by commits (and once at start); also every two seconds, only to notice a
        // promotion or its undoing: a failed apply is retried after the next commit, not
        // in a loop.
        let mut woken = rx.recv_timeout(Duration::from_secs(2)).is_ok();
        while rx.try_recv().is_ok() {}
        if r.is_promoted() {
            if !said_promoted {
                log(&format!(
                    "promoted: not applying restore points to {} any more",
                    r.describe()
                ));
                said_promoted = true;
            }
            continue;
        }
        if said_promoted {
            log(&format!(
                "promotion undone: applying restore points to {} again (whole restore first)",
                r.describe()
            ));
            said_promoted = false;
            woken = true;
        }
        if !woken {
            continue;
        }
        // Until up to date: finishing an apply that was interrupted (or failed) brings
        // the replica to that apply's point, and the newest may be further on.
        loop {
            match r.apply_latest() {
                Ok(Outcome::Applied(rep)) => {
                    log(&format!("replica {}: {}", r.describe(), rep.summary()));
                    continue;
                }
                Ok(Outcome::NotApplied(n)) => {
                    log(&format!("replica {}: {}", r.describe(), n.reason))
                }
                Ok(Outcome::UpToDate | Outcome::Promoted) => {}
                Err(e) => log(&format!(
                    "replica {}: apply failed: {e:#} (retried after the next commit)",
                    r.describe()
                )),
            }
            break;
        }
    }
}

async fn accept_loop(ctx: Arc<Ctx>) -> Result<()> {
    let listener = TcpListener::bind(&ctx.cfg.listen)
        .await
        .with_context(|| format!("listening on {}", ctx.cfg.listen))?;
    let readers = ctx.cfg.readers.difference(&ctx.cfg.allowed).count();
    log(&format!(
        "listening on {} for repository {}{}; certificate {}; {} client key(s) allowed to \
         ship, {readers} to read only",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        ctx.cfg.repo.display(),
        match Replica::new(&ctx.cfg.repo, ctx.cfg.replicas.clone()) {
            Ok(r) => format!(", replica {}", r.describe()),
            Err(_) => String::new(),
        },
        ctx.cfg.identity.fingerprint(),
        ctx.cfg.allowed.len()
    ));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log(&format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tcp.set_nodelay(true).ok();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let seen = Seen::default();
            let config =
                match tls::server_config(&ctx.cfg.identity, ctx.allowed.clone(), seen.clone()) {
                    Ok(c) => c,
                    Err(e) => return log(&format!("{peer}: {e:#}")),
                };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let handshake = tokio::time::timeout(
                Duration::from_secs(15),
                acceptor.accept(tcp).into_fallible(),
            )
            .await;
            let shown = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let shown_text = shown
                .as_ref()
                .map(|f| format!("presented certificate {f}"))
                .unwrap_or_else(|| "presented no certificate".into());
            let mut stream = match handshake {
                Err(_) => {
                    return log(&format!(
                        "refused {peer}: no TLS handshake within 15 s ({shown_text})"
                    ))
                }
                Ok(Err((e, tcp))) => {
                    // The alert is sent; close gently (reading what the peer still sends)
                    // so it is read before a reset could discard it.
                    linger(tcp).await;
                    let why = match shown {
                        Some(_) => "certificate not allowed".to_string(),
                        None => format!("handshake failed: {e}"),
                    };
                    return log(&format!("refused {peer}: {why} ({shown_text})"));
                }
                Ok(Ok(s)) => s,
            };
            let may_ship = shown.as_ref().is_some_and(|f| ctx.cfg.allowed.contains(f));
            let who = format!("{peer} ({})", shown.map(|f| f.0).unwrap_or_default());
            let start = Instant::now();
            let mut stats = Stats::default();
            let result = session(&mut stream, &ctx, may_ship, &mut stats).await;
            let secs = start.elapsed().as_secs_f64();
            match result {
                Ok(()) if stats.read => log(&format!(
                    "read session {who}: {} request(s), {} chunks ({} bytes) sent, {} object(s) not found, {secs:.1} s",
                    stats.requests, stats.chunks_sent, stats.bytes_sent, stats.not_found
                )),
                Ok(()) => log(&format!(
                    "session {who}: {} restore point(s) committed{}, {} chunks stored ({} bytes), {} already present, {secs:.1} s",
                    stats.committed.len(),
                    if stats.committed.is_empty() { String::new() } else { format!(" ({})", stats.committed.join(", ")) },
                    stats.chunks_stored,
                    stats.bytes_stored,
                    stats.chunks_present,
                )),
                Err(e) => {
                    if e.chain().any(|c| c.is::<Denied>()) {
                        log(&format!("refused {who}: {e:#}"));
                    } else if stats.read {
                        log(&format!(
                            "read session {who} ended: {e:#} (after {} request(s))",
                            stats.requests
                        ));
                    } else {
                        log(&format!(
                            "session {who} ended: {e:#} (after {} restore point(s) committed, {} chunks stored; a rerun resumes)",
                            stats.committed.len(),
                            stats.chunks_stored
                        ));
                    }
                    let msg = p::ErrorMsg {
                        code: error_code(&e).into(),
                        message: format!("{e:#}"),
                    };
                    let t = Duration::from_secs(5);
                    if p::write_json(&mut stream, Kind::Error, &msg, t).await.is_ok() {
                        let _ = p::flush(&mut stream, t).await;
                    }
                }
            }
        });
    }
}

async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn error_code(e: &anyhow::Error) -> &'static str {
    for c in e.chain() {
        if let Some(f) = c.downcast_ref::<FormatError>() {
            return match f {
                FormatError::Corrupt { .. } => "damaged",
                FormatError::Unsupported { .. } | FormatError::Unavailable { .. } => "unsupported",
                FormatError::Missing { .. } => "incomplete",
                _ => "internal",
            };
        }
        if let Some(pe) = c.downcast_ref::<PeerError>() {
            return match pe {
                PeerError::Reported { .. } => "internal",
                PeerError::Violation(_) => "violation",
            };
        }
        if c.downcast_ref::<Conflict>().is_some() {
            return "conflict";
        }
        if c.downcast_ref::<Denied>().is_some() {
            return "denied";
        }
    }
    "internal"
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Conflict(String);

/// The key may not do what the session asked (a read-only key asking to ship).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Denied(String);

#[derive(Default)]
struct Stats {
    committed: Vec<String>,
    chunks_stored: u64,
    bytes_stored: u64,
    chunks_present: u64,
    /// A read session: what it served.
    read: bool,
    requests: u64,
    chunks_sent: u64,
    bytes_sent: u64,
    not_found: u64,
}

/// An index being received: scratch file and bytes so far.
struct Incoming {
    file: File,
    path: PathBuf,
    len: u64,
}

/// One session; `may_ship`: the client's key is in the allowed set (not only a reader's).
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    ctx: &Ctx,
    may_ship: bool,
    stats: &mut Stats,
) -> Result<()> {
    let t = ctx.cfg.timeout;
    let hello: p::Hello = p::read_frame(s, t).await?.expect(Kind::Hello)?.json()?;
    let version = hello
        .versions
        .iter()
        .copied()
        .filter(|v| p::VERSIONS.contains(v))
        .max();
    let Some(version) = version.filter(|_| hello.protocol == p::PROTOCOL) else {
        return Err(FormatError::unsupported(
            "standby protocol",
            format!(
                "client offers {} versions {:?}, this standby speaks {:?}: upgrade the older side",
                hello.protocol,
                hello.versions,
                p::VERSIONS
            ),
        )
        .into());
    };
    if hello.session == p::SessionKind::Read {
        if version < p::READ_VERSION {
            return Err(PeerError::Violation(format!(
                "a read session needs protocol version {} or later, and version {version} \
                 was agreed",
                p::READ_VERSION
            ))
            .into());
        }
        stats.read = true;
        return read_session(s, ctx, version, stats).await;
    }
    if !may_ship {
        return Err(Denied(
            "this key may only read (it is allowed with --allow-reader), and it asked to \
             ship restore points: nothing was written; allow it with --allow to let it ship"
                .into(),
        )
        .into());
    }
    let _writer = ctx.writer.lock().await;
    let root = ctx.cfg.repo.clone();
    let (mut store, mut checks) = blocking(|| open_for_ship(&root))?;
    let points = blocking(|| -> Result<Vec<p::PointRef>> {
        let mut out = Vec::new();
        for id in store.list_manifests()? {
            let bytes = store.read_manifest(&id)?;
            out.push(p::PointRef {
                id,
                manifest_sha256: Digest::of_bytes(&bytes).to_hex(),
            });
        }
        Ok(out)
    })?;
    let welcome = p::Welcome {
        version,
        software: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
        points,
    };
    p::write_json(s, Kind::Welcome, &welcome, t).await?;
    p::flush(s, t).await?;

    let mut begun: Option<p::Begin> = None;
    let mut incoming: HashMap<Digest, Incoming> = HashMap::new();
    let mut batch_stored = (0u64, 0u64);
    // Whether the client sent its repository's protection (version 3): only then may it
    // ship into a protected repository, and only first.
    let mut protection_sent = false;
    let permits = Arc::new(tokio::sync::Semaphore::new(CHUNK_WORKERS));
    type Work = tokio::task::JoinHandle<std::result::Result<u64, FormatError>>;
    let mut pending: Vec<Work> = Vec::new();
    loop {
        let f = p::read_frame(s, t).await?;
        match f.kind {
            Kind::Protection if version >= p::PROTECTED_VERSION && !protection_sent => {
                if begun.is_some() {
                    return Err(PeerError::Violation("Protection after Begin".into()).into());
                }
                if !ctx.cfg.replicas.is_empty() && ctx.cfg.open.is_none() {
                    return Err(Denied(format!(
                        "this standby keeps {} replica disk(s) up to date from the restore \
                         points it receives, which needs an encrypted or signed repository's \
                         key, and it was not given one: run it with --key-file or \
                         --password-file, or ship this repository to a standby without \
                         --replica (nothing was written)",
                        ctx.cfg.replicas.len()
                    ))
                    .into());
                }
                let msg: p::RepoProtection = f.json()?;
                let (config, slots) = msg.decode()?;
                drop(checks);
                drop(store);
                (store, checks) = blocking(|| adopt_protection(&root, &config, &slots))?;
                protection_sent = true;
                p::write_frame(s, Kind::ProtectionOk, &[], t).await?;
                p::flush(s, t).await?;
            }
            Kind::Begin => {
                let b: p::Begin = f.json()?;
                if checks.protected() && !protection_sent {
                    return Err(Conflict(format!(
                        "this standby's repository is a copy of the {} repository {}, and \
                         the client's repository is not protected: use another --repo on the \
                         standby for it",
                        checks.describe(),
                        checks.config().repository_id
                    ))
                    .into());
                }
                if !bkimg_format::manifest::valid_id(&b.id) {
                    return Err(PeerError::Violation(format!("invalid id {:?}", b.id)).into());
                }
                let mut missing = Vec::new();
                for h in &b.indexes {
                    let d = Digest::from_hex(h)
                        .ok_or_else(|| PeerError::Violation(format!("bad index id {h:?}")))?;
                    if !store.index_path(&d).exists() {
                        missing.push(h.clone());
                    }
                }
                p::write_json(
                    s,
                    Kind::Plan,
                    &p::Plan {
                        missing_indexes: missing,
                    },
                    t,
                )
                .await?;
                p::flush(s, t).await?;
                begun = Some(b);
            }
            Kind::Query => {
                let ds = p::unpack_digests(&f.body)?;
                let lacks = blocking(|| -> Result<Vec<u8>> {
                    ds.iter()
                        .map(|d| Ok(u8::from(!store.has_chunk(d)?)))
                        .collect()
                })?;
                stats.chunks_present += lacks.iter().filter(|&&l| l == 0).count() as u64;
                p::write_frame(s, Kind::Lacks, &[&lacks], t).await?;
                p::flush(s, t).await?;
            }
            Kind::Chunk => {
                let d = p::digest_at(&f.body, 0)?;
                // Checked and stored by a blocking worker while the next frame is read;
                // the permits bound the chunks held in memory.
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let store = store.clone();
                let sealed = checks.sealed();
                let body = f.body;
                pending.push(tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let blob = &body[32..];
                    if sealed {
                        // Without the key: the envelope's form and size.
                        check_sealed_chunk(&d, blob)?;
                    } else {
                        // Verified before it is stored: header, length, decompression,
                        // digest.
                        let mut plain = Vec::new();
                        chunk::decode_into(blob, &d, &store.chunk_ids(), &mut plain)?;
                    }
                    if !store.has_chunk(&d)? {
                        store.put_chunk(&d, blob)?;
                    }
                    Ok(blob.len() as u64)
                }));
            }
            Kind::BatchEnd => {
                // The client reads only after the batch, so a bad blob is reported here.
                let mut first_err: Option<FormatError> = None;
                for h in pending.drain(..) {
                    match h.await.context("chunk worker")? {
                        Ok(n) => {
                            stats.chunks_stored += 1;
                            stats.bytes_stored += n;
                            batch_stored.0 += 1;
                            batch_stored.1 += n;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err {
                    return Err(e.into());
                }
                let ok = p::BatchOk {
                    stored: batch_stored.0,
                    bytes: batch_stored.1,
                };
                batch_stored = (0, 0);
                p::write_json(s, Kind::BatchOk, &ok, t).await?;
                p::flush(s, t).await?;
            }
            Kind::IndexPart => {
                if f.body.len() < 40 {
                    return Err(
                        PeerError::Violation("IndexPart shorter than its head".into()).into(),
                    );
                }
                let id = p::digest_at(&f.body, 0)?;
                let offset = u64::from_le_bytes(f.body[32..40].try_into().expect("checked"));
                let data = &f.body[40..];
                if !begun
                    .as_ref()
                    .is_some_and(|b| b.indexes.contains(&id.to_hex()))
                {
                    return Err(PeerError::Violation(format!("index {id} not announced")).into());
                }
                let inc = match incoming.entry(id) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let (file, path) = blocking(|| store.scratch_file())?;
                        v.insert(Incoming { file, path, len: 0 })
                    }
                };
                if offset != inc.len {
                    return Err(PeerError::Violation(format!(
                        "index {id} part at {offset}, expected {}",
                        inc.len
                    ))
                    .into());
                }
                if inc.len + data.len() as u64 > p::INDEX_MAX {
                    return Err(PeerError::Violation(format!("index {id} too large")).into());
                }
                blocking(|| inc.file.write_all_at(data, inc.len))
                    .with_context(|| format!("writing {}", inc.path.display()))?;
                inc.len += data.len() as u64;
            }
            Kind::IndexEnd => {
                let id = p::digest_at(&f.body, 0)?;
                let inc = incoming
                    .remove(&id)
                    .ok_or_else(|| PeerError::Violation(format!("index {id} ended unsent")))?;
                let sealed = checks.sealed();
                blocking(|| {
                    if sealed {
                        store_sealed_index(&store, &id, inc)
                    } else {
                        store_index(&store, &id, inc)
                    }
                })?;
                p::write_frame(s, Kind::IndexOk, &[], t).await?;
                p::flush(s, t).await?;
            }
            Kind::Commit => {
                let b = begun
                    .take()
                    .ok_or_else(|| PeerError::Violation("commit without begin".into()))?;
                blocking(|| match &checks {
                    Checks::Whole { reader, .. } => {
                        check_and_commit(&store, reader, checks.signed(), &b, &f.body)
                    }
                    Checks::Sealed { .. } => check_and_commit_sealed(&store, &b, &f.body),
                })?;
                stats.committed.push(b.id.clone());
                if let Some(tx) = ctx
                    .applier
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    let _ = tx.send(());
                }
                p::write_json(s, Kind::Committed, &p::Committed { id: b.id }, t).await?;
                p::flush(s, t).await?;
            }
            Kind::Bye => return Ok(()),
            other => return Err(PeerError::Violation(format!("unexpected {other:?} frame")).into()),
        }
    }
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A read session: answers requests for stored objects, one after another, until Bye. It
/// does not wait for ship sessions (it reads only committed objects, which are complete
/// files renamed into place) but holds the repository's shared lock like them, so that a
/// prune cannot delete under it.
async fn read_session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    ctx: &Ctx,
    version: u32,
    stats: &mut Stats,
) -> Result<()> {
    let t = ctx.cfg.timeout;
    let root = ctx.cfg.repo.clone();
    // Protected or not: what is served is what is stored, for a reader with the key.
    let (store, _) = blocking(|| LocalDir::open_any(&root))?;
    let welcome = p::Welcome {
        version,
        software: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
        points: Vec::new(),
    };
    p::write_json(s, Kind::Welcome, &welcome, t).await?;
    p::flush(s, t).await?;
    loop {
        let f = p::read_frame(s, t).await?;
        stats.requests += 1;
        // The answer: a frame, or None for "not found".
        let answer: Option<(Kind, Vec<u8>)> = match f.kind {
            Kind::List => {
                let ids = blocking(|| store.list_manifests())?;
                let body = serde_json::to_vec(&p::Listing { ids }).expect("serializes");
                Some((Kind::Listing, body))
            }
            Kind::GetManifest => {
                let id = p::parse_id(&f.body)?;
                found(blocking(|| store.read_manifest(&id)))?.map(|b| (Kind::ManifestData, b))
            }
            Kind::GetIndex => {
                let (id, offset) = p::parse_get_index(&f.body)?;
                blocking(|| index_part(&store.index_path(&id), &id, offset))?
                    .map(|body| (Kind::IndexData, body))
            }
            Kind::GetChunk => {
                let d = p::digest_at(&f.body, 0)?;
                let mut blob = Vec::new();
                let got = found(blocking(|| store.read_chunk(&d, &mut blob)))?;
                got.map(|()| {
                    stats.chunks_sent += 1;
                    stats.bytes_sent += blob.len() as u64;
                    (Kind::ChunkData, blob)
                })
            }
            Kind::Query => {
                let ds = p::unpack_digests(&f.body)?;
                let lacks = blocking(|| -> Result<Vec<u8>> {
                    ds.iter()
                        .map(|d| Ok(u8::from(!store.has_chunk(d)?)))
                        .collect()
                })?;
                Some((Kind::Lacks, lacks))
            }
            Kind::GetPruneRecord => {
                let id = p::parse_id(&f.body)?;
                blocking(|| store.read_prune_record(&id))?.map(|b| (Kind::PruneRecordData, b))
            }
            Kind::GetConfig if version >= p::PROTECTED_VERSION => {
                let msg = blocking(|| -> Result<p::RepoProtection> {
                    let config = std::fs::read(store.root().join("config"))
                        .with_context(|| format!("reading {}/config", store.root().display()))?;
                    Ok(p::RepoProtection::new(&config, &store.key_slots()?))
                })?;
                let body = serde_json::to_vec(&msg).expect("serializes");
                Some((Kind::ConfigData, body))
            }
            Kind::Bye => return Ok(()),
            other => {
                return Err(PeerError::Violation(format!(
                    "a {other:?} frame in a read session (which reads, and never writes)"
                ))
                .into())
            }
        };
        match answer {
            Some((kind, body)) => p::write_frame(s, kind, &[&body], t).await?,
            None => {
                stats.not_found += 1;
                p::write_frame(s, Kind::NotFound, &[], t).await?
            }
        }
        p::flush(s, t).await?;
    }
}

/// A missing object is an answer (None), not a failure of the session.
fn found<T>(r: bkimg_format::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(FormatError::Missing { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The body of an IndexData answer: the index's length (u64 LE), then up to
/// [`p::INDEX_PART_MAX`] bytes of it from `offset`; None if the index is not stored.
fn index_part(path: &Path, id: &Digest, offset: u64) -> Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::Error::from(e).context(format!("opening {}", path.display()))),
    };
    let total = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if total > p::INDEX_MAX {
        return Err(FormatError::corrupt(
            format!("volume index {id}"),
            format!(
                "{} is {total} bytes, more than any index can be",
                path.display()
            ),
        )
        .into());
    }
    if offset > total {
        return Err(PeerError::Violation(format!(
            "index {id} asked from byte {offset}, past its end at {total}"
        ))
        .into());
    }
    let n = (total - offset).min(p::INDEX_PART_MAX as u64) as usize;
    let mut body = vec![0u8; 8 + n];
    body[..8].copy_from_slice(&total.to_le_bytes());
    file.read_exact_at(&mut body[8..], offset)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(body))
}

/// What the standby can check of what it receives into its repository.
enum Checks {
    /// Everything (spec/standby-protocol.md §3.1): a repository without encryption, or a
    /// signed one, read without its key (every check but the MACs, which need the key).
    Whole {
        reader: Repository,
        config: RepoConfig,
    },
    /// An encrypted repository, whose key the standby does not hold: the form, size and
    /// name of each sealed object, and the links between points (§6.2).
    Sealed { config: RepoConfig },
}

impl Checks {
    fn new(store: &Arc<LocalDir>, config: RepoConfig) -> Result<Checks> {
        Ok(match &config.encryption {
            None => Checks::Whole {
                reader: Repository::new(Box::new(store.clone())),
                config,
            },
            Some(enc) if enc.mode == Mode::Signed => {
                let protection = Arc::new(Protection::unauthenticated(enc)?);
                Checks::Whole {
                    reader: Repository::new(Box::new(Protected::new(store.clone(), protection))),
                    config,
                }
            }
            Some(_) => Checks::Sealed { config },
        })
    }

    fn config(&self) -> &RepoConfig {
        match self {
            Checks::Whole { config, .. } | Checks::Sealed { config } => config,
        }
    }

    fn protected(&self) -> bool {
        self.config().encryption.is_some()
    }

    /// Manifests and prune records are in MAC envelopes.
    fn signed(&self) -> bool {
        self.config()
            .encryption
            .as_ref()
            .is_some_and(|e| e.mode == Mode::Signed)
    }

    fn sealed(&self) -> bool {
        matches!(self, Checks::Sealed { .. })
    }

    fn describe(&self) -> &'static str {
        match self.config().encryption.as_ref().map(|e| e.mode) {
            None | Some(Mode::None) => "not protected",
            Some(Mode::Encrypted) => "encrypted",
            Some(Mode::Signed) => "signed",
        }
    }
}

/// Opens the standby's repository for a ship session, protected or not.
fn open_for_ship(root: &Path) -> Result<(Arc<LocalDir>, Checks)> {
    let (store, config) = LocalDir::open_any(root)?;
    let store = Arc::new(store);
    let checks = Checks::new(&store, config)?;
    Ok((store, checks))
}

/// Takes a protected repository's config and key slots (a Protection frame). The standby's
/// repository becomes a copy of that repository's config when it holds no restore point
/// yet; one that already is gets the client's key slots (slots added, changed or removed
/// there are here too, so a passphrase removed there stops opening this copy); any other
/// is a conflict, and nothing is changed.
fn adopt_protection(
    root: &Path,
    config: &[u8],
    slots: &[(String, Vec<u8>)],
) -> Result<(Arc<LocalDir>, Checks)> {
    let theirs = parse_config(
        config,
        "the client's repository",
        "the client's repository config",
        true,
    )?;
    if theirs.encryption.is_none() {
        return Err(PeerError::Violation(
            "a Protection frame for a repository that is not protected".into(),
        )
        .into());
    }
    for (id, bytes) in slots {
        Slot::decode(bytes)?.check_stored_as(id, &theirs.repository_id)?;
    }
    let (store, ours) = LocalDir::open_any(root)?;
    let same = |ours: &RepoConfig| {
        ours.repository_id == theirs.repository_id && ours.encryption == theirs.encryption
    };
    if !same(&ours) {
        drop(store);
        // Nobody may read the repository while its config changes under them.
        let (store, ours) = LocalDir::open_exclusive_any(root, false)?;
        if !same(&ours) {
            if ours.encryption.is_some() || store.has_points()? {
                return Err(Conflict(format!(
                    "the standby's repository {} holds restore points of repository {} ({}), \
                     and the client ships repository {}: a standby repository holds one \
                     protected repository; use another --repo on the standby",
                    root.display(),
                    ours.repository_id,
                    match ours.encryption.as_ref().map(|e| e.mode) {
                        Some(Mode::Encrypted) => "encrypted",
                        Some(Mode::Signed) => "signed",
                        _ => "not protected",
                    },
                    theirs.repository_id
                ))
                .into());
            }
            store.replace_config(&theirs)?;
            log(&format!(
                "repository {} now holds the {} repository {} (its config and key slots \
                 came from the client)",
                root.display(),
                if theirs
                    .encryption
                    .as_ref()
                    .is_some_and(|e| e.mode == Mode::Signed)
                {
                    "signed"
                } else {
                    "encrypted"
                },
                theirs.repository_id
            ));
        }
    }
    let (store, checks) = open_for_ship(root)?;
    let have = store.key_slots()?;
    for (id, bytes) in slots {
        if !have.iter().any(|(i, b)| i == id && b == bytes) {
            store.put_key_slot(id, bytes)?;
        }
    }
    for (id, _) in &have {
        if !slots.iter().any(|(i, _)| i == id) {
            store.delete_key_slot(id)?;
        }
    }
    Ok((store, checks))
}

/// A chunk of an encrypted repository, checked without the key: an envelope of a chunk
/// (spec/format.md §18.4 steps 1-2) no shorter than one around a chunk header.
fn check_sealed_chunk(d: &Digest, blob: &[u8]) -> std::result::Result<(), FormatError> {
    check_envelope(ObjectKind::Chunk, &d.to_hex(), blob)?;
    if blob.len() < ENVELOPE_OVERHEAD + chunk::HEADER_LEN {
        return Err(FormatError::corrupt(
            format!("chunk {d}"),
            format!(
                "{} bytes, shorter than an envelope around a chunk header",
                blob.len()
            ),
        ));
    }
    Ok(())
}

/// An index of an encrypted repository, checked without the key (the header of its
/// segmented envelope and room for one segment), and moved into the repository. Whether
/// it names only stored chunks is for a reader with the key to check.
fn store_sealed_index(store: &LocalDir, id: &Digest, inc: Incoming) -> Result<()> {
    inc.file.sync_all().ok();
    let mut head = [0u8; STREAM_HEADER_LEN];
    if inc.len < (STREAM_HEADER_LEN + NONCE_LEN + TAG_LEN) as u64
        || inc.file.read_exact_at(&mut head, 0).is_err()
    {
        return Err(FormatError::corrupt(
            format!("volume index {id}"),
            format!("{} bytes, shorter than an encrypted index can be", inc.len),
        )
        .into());
    }
    check_stream_header(ObjectKind::Index, &id.to_hex(), &head)?;
    store.put_index(id, &inc.path)?;
    Ok(())
}

/// Whether restore point `id` is committed already with exactly `bytes` (a repeated
/// commit, accepted); other bytes under that id are a conflict.
fn already_committed(store: &LocalDir, id: &str, bytes: &[u8]) -> Result<bool> {
    match store.read_manifest(id) {
        Ok(existing) if existing == bytes => Ok(true),
        Ok(_) => Err(Conflict(format!("a different restore point {id} is already stored")).into()),
        Err(_) => Ok(false),
    }
}

/// The commit point of an encrypted repository, whose manifests the standby cannot read:
/// the manifest is an envelope of a manifest with the announced SHA-256; the parent link
/// Begin states holds against what is stored (the parent's manifest with that SHA-256, or
/// a prune record for it, held or sent); every index Begin names is stored. Then it is
/// written, durably and last.
fn check_and_commit_sealed(store: &LocalDir, b: &p::Begin, bytes: &[u8]) -> Result<()> {
    let sha = Digest::of_bytes(bytes);
    if sha.to_hex() != b.manifest_sha256 {
        return Err(FormatError::corrupt(
            format!("manifest of {}", b.id),
            "its SHA-256 differs from the one announced",
        )
        .into());
    }
    check_envelope(ObjectKind::Manifest, &b.id, bytes)?;
    if already_committed(store, &b.id, bytes)? {
        return Ok(());
    }
    if let Some(parent) = &b.parent {
        match store.read_manifest(&parent.id) {
            Ok(theirs) => {
                let sha = Digest::of_bytes(&theirs).to_hex();
                if parent.stored_sha256.as_ref().is_some_and(|s| *s != sha) {
                    return Err(FormatError::corrupt(
                        format!("restore point {}", b.id),
                        format!("its parent link does not match the standby's {}", parent.id),
                    )
                    .into());
                }
            }
            Err(FormatError::Missing { .. }) => {
                if store.read_prune_record(&parent.id)?.is_none() {
                    let Some(hex_record) = &b.parent_pruned else {
                        return Err(FormatError::missing(format!(
                            "parent restore point {} of {} on the standby (send parents first)",
                            parent.id, b.id
                        ))
                        .into());
                    };
                    let record = hex::decode(hex_record)
                        .map_err(|_| PeerError::Violation("parent_pruned is not hex".into()))?;
                    check_envelope(ObjectKind::PruneRecord, &parent.id, &record)?;
                    store.put_prune_record(&parent.id, &record)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    for h in &b.indexes {
        let d = Digest::from_hex(h)
            .ok_or_else(|| PeerError::Violation(format!("bad index id {h:?}")))?;
        if !store.index_path(&d).exists() {
            return Err(FormatError::missing(format!(
                "volume index {d} of restore point {}",
                b.id
            ))
            .into());
        }
    }
    store.commit_manifest(&b.id, bytes)?;
    Ok(())
}

/// Checks a received index (header names it, entries match their digest, every chunk it
/// names is stored) and moves it into the repository.
fn store_index(store: &LocalDir, id: &Digest, inc: Incoming) -> Result<()> {
    inc.file.sync_all().ok();
    let mut r = BufReader::with_capacity(1 << 20, File::open(&inc.path)?);
    let mut head = [0u8; index::HEADER_LEN];
    r.read_exact(&mut head)
        .map_err(|_| FormatError::corrupt(format!("volume index {id}"), "shorter than a header"))?;
    let header = IndexHeader::parse(&head)?;
    if header.id() != *id || header.object_len() != inc.len {
        return Err(FormatError::corrupt(
            format!("volume index {id}"),
            "its header does not match its id or length",
        )
        .into());
    }
    let mut entries = EntryReader::new(r, header);
    let mut batch = Vec::new();
    loop {
        entries.next_batch(8192, &mut batch)?;
        if batch.is_empty() {
            break;
        }
        for d in batch.iter().filter(|d| !d.is_hole()) {
            if !store.has_chunk(d)? {
                return Err(FormatError::missing(format!(
                    "chunk {d} named by volume index {id} (send chunks before their index)"
                ))
                .into());
            }
        }
    }
    store.put_index(id, &inc.path)?;
    Ok(())
}

/// A parent the standby lacks is acceptable only as a pruned one: a prune record it holds,
/// or one the client sent with the point (stored now, after checking it fits the link).
fn accept_pruned_parent(
    store: &LocalDir,
    reader: &Repository,
    signed: bool,
    parent: &bkimg_format::manifest::ParentRef,
    b: &p::Begin,
) -> Result<()> {
    if reader.pruned_link(parent)?.is_some() {
        return Ok(());
    }
    let missing = || {
        FormatError::missing(format!(
            "parent restore point {} of {} on the standby (send parents first)",
            parent.id, b.id
        ))
    };
    let Some(hex_record) = &b.parent_pruned else {
        return Err(missing().into());
    };
    let bytes = hex::decode(hex_record)
        .map_err(|_| PeerError::Violation("parent_pruned is not hex".into()))?;
    let record = PruneRecord::decode(match signed {
        true => mac_strip(ObjectKind::PruneRecord, &parent.id, &bytes)?,
        false => &bytes,
    })?;
    if record.id != parent.id || record.manifest_sha256 != parent.manifest_sha256 {
        return Err(FormatError::corrupt(
            format!("prune record of {}", parent.id),
            "it records another manifest than the point's parent link",
        )
        .into());
    }
    store.put_prune_record(&parent.id, &bytes)?;
    Ok(())
}

/// The commit point: the manifest is stored only when the point is complete and its link
/// to the parent holds.
fn check_and_commit(
    store: &LocalDir,
    reader: &Repository,
    signed: bool,
    b: &p::Begin,
    bytes: &[u8],
) -> Result<()> {
    let sha = Digest::of_bytes(bytes);
    if sha.to_hex() != b.manifest_sha256 {
        return Err(FormatError::corrupt(
            format!("manifest of {}", b.id),
            "its SHA-256 differs from the one announced",
        )
        .into());
    }
    // Signed: the MAC envelope's form (its MAC needs the key).
    let m = Manifest::decode(match signed {
        true => mac_strip(ObjectKind::Manifest, &b.id, bytes)?,
        false => bytes,
    })?;
    if m.id != b.id {
        return Err(PeerError::Violation(format!(
            "manifest names itself {:?}, not {:?}",
            m.id, b.id
        ))
        .into());
    }
    if already_committed(store, &m.id, bytes)? {
        return Ok(());
    }
    if let Some(parent) = &m.parent {
        let theirs = match reader.point(&parent.id) {
            Ok(p) => Some(p),
            Err(FormatError::Missing { .. }) => {
                accept_pruned_parent(store, reader, signed, parent, b)?;
                None
            }
            Err(e) => return Err(e.into()),
        };
        if theirs.is_some_and(|t| t.manifest_sha256.to_hex() != parent.manifest_sha256) {
            return Err(FormatError::corrupt(
                format!("restore point {}", m.id),
                format!("its parent link does not match the standby's {}", parent.id),
            )
            .into());
        }
    }
    let mut batch = Vec::new();
    for (disk, vol, idx) in m.indexes() {
        let Some(idx) = idx else { continue };
        let mut entries = reader.index(&idx)?;
        let h = *entries.header();
        if h.volume_size != vol.size || h.chunk_size != m.chunk_size {
            return Err(FormatError::corrupt(
                format!("volume index {idx}"),
                format!("does not fit {} {} of the manifest", disk.name, vol.name),
            )
            .into());
        }
        loop {
            entries.next_batch(8192, &mut batch)?;
            if batch.is_empty() {
                break;
            }
            for d in batch.iter().filter(|d| !d.is_hole()) {
                if !store.has_chunk(d)? {
                    return Err(FormatError::missing(format!(
                        "chunk {d} of restore point {}",
                        m.id
                    ))
                    .into());
                }
            }
        }
    }
    store.commit_manifest(&m.id, bytes)?;
    Ok(())
}

/// A new repository's id.
fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkimg_format::manifest::{
        CompressionInfo, Content, Disk, ParentRef, PartitionTable, Volume, VolumeRole,
    };

    const CS: u32 = 4096;

    /// A one-volume restore point of two chunks, as a client would send it.
    struct Sent {
        chunks: Vec<(Digest, Vec<u8>)>,
        index_id: Digest,
        index: Vec<u8>,
        manifest: Vec<u8>,
        id: String,
    }

    fn point(id: &str, seed: u8, parent: Option<&Sent>) -> Sent {
        let plains = [
            vec![seed; CS as usize],
            vec![seed.wrapping_add(1); CS as usize],
        ];
        let chunks: Vec<(Digest, Vec<u8>)> = plains
            .iter()
            .map(|p| {
                let d = Digest::of_chunk(p);
                (d, chunk::encode(p, d, 3).unwrap())
            })
            .collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| c.0).collect();
        let (h, index) = index::encode(2 * u64::from(CS), CS, &digests);
        let m = Manifest {
            id: id.into(),
            created: "2026-11-21T12:00:00Z".into(),
            host: "test".into(),
            tool: "bkimg test".into(),
            parent: parent.map(|p| ParentRef {
                id: p.id.clone(),
                manifest_sha256: Digest::of_bytes(&p.manifest).to_hex(),
            }),
            chunk_size: CS,
            compression: CompressionInfo {
                algorithm: "zstd".into(),
                level: 3,
            },
            disks: vec![Disk {
                name: "disk0".into(),
                source: "test.img".into(),
                size: 2 * u64::from(CS),
                logical_sector_size: 512,
                table: PartitionTable::None,
                volumes: vec![Volume {
                    name: "whole".into(),
                    role: VolumeRole::Whole,
                    partition: None,
                    offset: 0,
                    size: 2 * u64::from(CS),
                    filesystem: None,
                    content: Content::Data {
                        index: h.id().to_hex(),
                        mode: "raw".into(),
                        bytes_read: 0,
                        bytes_data: 0,
                        bytes_stored_new: 0,
                    },
                }],
                tracking: None,
            }],
            firmware: None,
            consistency: None,
            sequence: None,
        };
        Sent {
            chunks,
            index_id: h.id(),
            index,
            manifest: m.encode(),
            id: id.into(),
        }
    }

    /// Runs a session against a fresh standby repository; the client side is `script`.
    fn with_session<F, Fut>(script: F) -> (tempfile::TempDir, Result<()>)
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        run_session(true, false, &[], |c, _| script(c))
    }

    /// Runs a session against a fresh standby repository holding the points `stored`;
    /// `may_ship`: the client's key may ship; `hold_writer`: a ship session holds the
    /// writer's turn meanwhile. The client side is `script`, given the repository's path.
    fn run_session<F, Fut>(
        may_ship: bool,
        hold_writer: bool,
        stored: &[&Sent],
        script: F,
    ) -> (tempfile::TempDir, Result<()>)
    where
        F: FnOnce(tokio::io::DuplexStream, PathBuf) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let store = LocalDir::open_or_create(&repo, "test", "2026-11-21T12:00:00Z").unwrap();
        for point in stored {
            store_point(&store, point);
        }
        drop(store);
        tls::keygen(&dir.path().join("key")).unwrap();
        let ctx = Ctx {
            cfg: ServeConfig {
                listen: String::new(),
                repo: repo.clone(),
                replicas: Vec::new(),
                identity: Identity::load(&dir.path().join("key")).unwrap(),
                allowed: BTreeSet::new(),
                readers: BTreeSet::new(),
                timeout: Duration::from_secs(5),
                open: None,
            },
            allowed: Arc::new(BTreeSet::new()),
            writer: tokio::sync::Mutex::new(()),
            applier: Mutex::new(None),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(async {
            let _turn = hold_writer.then(|| ctx.writer.try_lock().unwrap());
            let (mut server_end, client_end) = tokio::io::duplex(1 << 20);
            let ctx = &ctx;
            // The server's end closes when its session ends, as a connection would.
            let server = async move {
                let mut stats = Stats::default();
                session(&mut server_end, ctx, may_ship, &mut stats).await
            };
            let (r, ()) = tokio::join!(server, script(client_end, repo));
            r
        });
        (dir, result)
    }

    /// Stores a point as a commit on the standby would have.
    fn store_point(store: &LocalDir, s: &Sent) {
        for (d, blob) in &s.chunks {
            store.put_chunk(d, blob).unwrap();
        }
        let (mut f, path) = store.scratch_file().unwrap();
        std::io::Write::write_all(&mut f, &s.index).unwrap();
        store.put_index(&s.index_id, &path).unwrap();
        store.commit_manifest(&s.id, &s.manifest).unwrap();
    }

    const T: Duration = Duration::from_secs(5);

    async fn hello(c: &mut tokio::io::DuplexStream) -> p::Welcome {
        hello_as(c, &[1], p::SessionKind::Ship)
            .await
            .unwrap()
            .json()
            .unwrap()
    }

    /// Sends Hello; returns the answer. (A refusal ends the session: the Error frame is
    /// the accept loop's, so here the connection just closes.)
    async fn hello_as(
        c: &mut tokio::io::DuplexStream,
        versions: &[u32],
        session: p::SessionKind,
    ) -> Result<Frame> {
        let h = p::Hello {
            protocol: p::PROTOCOL.into(),
            versions: versions.to_vec(),
            software: "test".into(),
            session,
        };
        p::write_json(c, Kind::Hello, &h, T).await.unwrap();
        p::read_frame(c, T).await
    }

    /// Sends a read request; returns the answer.
    async fn ask(c: &mut tokio::io::DuplexStream, kind: Kind, body: &[u8]) -> Frame {
        p::write_frame(c, kind, &[body], T).await.unwrap();
        p::read_frame(c, T).await.unwrap()
    }

    async fn begin(c: &mut tokio::io::DuplexStream, s: &Sent) {
        let b = p::Begin {
            id: s.id.clone(),
            manifest_sha256: Digest::of_bytes(&s.manifest).to_hex(),
            indexes: vec![s.index_id.to_hex()],
            parent_pruned: None,
            parent: None,
        };
        p::write_json(c, Kind::Begin, &b, T).await.unwrap();
        p::read_frame(c, T)
            .await
            .unwrap()
            .expect(Kind::Plan)
            .unwrap();
    }

    async fn send_index(c: &mut tokio::io::DuplexStream, s: &Sent) -> Result<Frame> {
        let id = s.index_id.0;
        p::write_frame(c, Kind::IndexPart, &[&id, &0u64.to_le_bytes(), &s.index], T)
            .await
            .unwrap();
        p::write_frame(c, Kind::IndexEnd, &[&id], T).await?;
        p::read_frame(c, T).await
    }

    async fn send_chunks(
        c: &mut tokio::io::DuplexStream,
        chunks: &[(Digest, Vec<u8>)],
    ) -> Result<Frame> {
        for (d, blob) in chunks {
            p::write_frame(c, Kind::Chunk, &[&d.0, blob], T).await?;
        }
        p::write_frame(c, Kind::BatchEnd, &[], T).await?;
        p::read_frame(c, T).await
    }

    use p::Frame;

    #[test]
    fn a_complete_point_is_committed() {
        let a = point("a", 1, None);
        let (dir, r) = with_session(|mut c| async move {
            // A version-1 client: the server speaks its version.
            let w = hello(&mut c).await;
            assert_eq!(w.version, 1);
            assert!(w.points.is_empty());
            begin(&mut c, &a).await;
            send_chunks(&mut c, &a.chunks)
                .await
                .unwrap()
                .expect(Kind::BatchOk)
                .unwrap();
            send_index(&mut c, &a)
                .await
                .unwrap()
                .expect(Kind::IndexOk)
                .unwrap();
            p::write_frame(&mut c, Kind::Commit, &[&a.manifest], T)
                .await
                .unwrap();
            p::read_frame(&mut c, T)
                .await
                .unwrap()
                .expect(Kind::Committed)
                .unwrap();
            p::write_frame(&mut c, Kind::Bye, &[], T).await.unwrap();
        });
        r.unwrap();
        assert!(dir.path().join("repo/points/a").exists());
    }

    #[test]
    fn a_damaged_chunk_is_refused_and_not_stored() {
        let a = point("a", 1, None);
        let mut bad = a.chunks.clone();
        let last = bad[1].1.len() - 1;
        bad[1].1[last] ^= 1;
        let d1 = bad[1].0;
        let (dir, r) = with_session(|mut c| async move {
            hello(&mut c).await;
            begin(&mut c, &a).await;
            // The server ends the session with the error; the test reads it as the
            // client would, after the batch.
            let _ = send_chunks(&mut c, &bad).await;
        });
        let e = r.unwrap_err();
        assert_eq!(error_code(&e), "damaged", "{e:#}");
        let store = LocalDir::open(&dir.path().join("repo")).unwrap();
        assert!(!store.has_chunk(&d1).unwrap());
    }

    #[test]
    fn an_index_naming_missing_chunks_is_refused() {
        let a = point("a", 1, None);
        let (dir, r) = with_session(|mut c| async move {
            hello(&mut c).await;
            begin(&mut c, &a).await;
            send_chunks(&mut c, &a.chunks[..1])
                .await
                .unwrap()
                .expect(Kind::BatchOk)
                .unwrap();
            let _ = send_index(&mut c, &a).await;
        });
        let e = r.unwrap_err();
        assert_eq!(error_code(&e), "incomplete", "{e:#}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("repo/indexes"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_point_whose_parent_is_missing_is_not_committed() {
        let a = point("a", 1, None);
        let b = point("b", 5, Some(&a));
        let (dir, r) = with_session(|mut c| async move {
            hello(&mut c).await;
            begin(&mut c, &b).await;
            send_chunks(&mut c, &b.chunks)
                .await
                .unwrap()
                .expect(Kind::BatchOk)
                .unwrap();
            send_index(&mut c, &b)
                .await
                .unwrap()
                .expect(Kind::IndexOk)
                .unwrap();
            p::write_frame(&mut c, Kind::Commit, &[&b.manifest], T)
                .await
                .unwrap();
            let _ = p::read_frame(&mut c, T).await;
        });
        let e = r.unwrap_err();
        assert_eq!(error_code(&e), "incomplete", "{e:#}");
        assert!(!dir.path().join("repo/points/b").exists());
    }

    #[test]
    fn an_oversized_frame_ends_the_session() {
        let (_dir, r) = with_session(|mut c| async move {
            hello(&mut c).await;
            // An IndexEnd claiming 1 GiB.
            let head = [0, 0, 0, 0x40, Kind::IndexEnd as u8];
            tokio::io::AsyncWriteExt::write_all(&mut c, &head)
                .await
                .unwrap();
        });
        let e = r.unwrap_err();
        assert_eq!(error_code(&e), "violation", "{e:#}");
    }

    #[test]
    fn a_read_session_serves_committed_objects_and_says_what_is_missing() {
        let a = point("a", 1, None);
        let sent = point("a", 1, None);
        let absent = Digest([0xee; 32]);
        // A reader's key, while a ship session holds the writer's turn: reads do not wait.
        let (dir, r) = run_session(false, true, &[&a], |mut c, repo| async move {
            let w: p::Welcome = hello_as(&mut c, &[1, 2], p::SessionKind::Read)
                .await
                .unwrap()
                .expect(Kind::Welcome)
                .unwrap()
                .json()
                .unwrap();
            assert_eq!(w.version, 2);

            let f = ask(&mut c, Kind::List, &[]).await;
            let l: p::Listing = f.expect(Kind::Listing).unwrap().json().unwrap();
            assert_eq!(l.ids, ["a"]);
            let f = ask(&mut c, Kind::GetManifest, b"a").await;
            assert_eq!(f.expect(Kind::ManifestData).unwrap().body, sent.manifest);
            for (kind, body) in [
                (Kind::GetManifest, &b"b"[..]),
                (Kind::GetManifest, &b"../config"[..]),
                (Kind::GetPruneRecord, &b"a"[..]),
                (Kind::GetChunk, &absent.0[..]),
                (Kind::GetIndex, &p::get_index(&absent, 0)[..]),
            ] {
                let f = ask(&mut c, kind, body).await;
                assert_eq!((f.kind, f.body.len()), (Kind::NotFound, 0), "{kind:?}");
            }

            let total = sent.index.len() as u64;
            let f = ask(&mut c, Kind::GetIndex, &p::get_index(&sent.index_id, 0)).await;
            let f = f.expect(Kind::IndexData).unwrap();
            assert_eq!(
                p::parse_index_data(&f.body, 0).unwrap(),
                (total, &sent.index[..])
            );
            let f = ask(&mut c, Kind::GetIndex, &p::get_index(&sent.index_id, 5)).await;
            let f = f.expect(Kind::IndexData).unwrap();
            assert_eq!(p::parse_index_data(&f.body, 5).unwrap().1, &sent.index[5..]);
            let f = ask(&mut c, Kind::GetIndex, &p::get_index(&sent.index_id, total)).await;
            let f = f.expect(Kind::IndexData).unwrap();
            assert!(p::parse_index_data(&f.body, total).unwrap().1.is_empty());

            let (d0, blob0) = &sent.chunks[0];
            let f = ask(&mut c, Kind::GetChunk, &d0.0).await;
            assert_eq!(&f.expect(Kind::ChunkData).unwrap().body, blob0);
            let f = ask(&mut c, Kind::Query, &p::pack_digests(&[*d0, absent])).await;
            assert_eq!(f.expect(Kind::Lacks).unwrap().body, [0, 1]);

            // The session holds the repository's shared lock: a prune is refused.
            let e = LocalDir::open_exclusive(&repo, false).err().unwrap();
            assert!(matches!(e, FormatError::Busy(_)), "{e}");
            p::write_frame(&mut c, Kind::Bye, &[], T).await.unwrap();
        });
        r.unwrap();
        // Released when the session ended.
        LocalDir::open_exclusive(&dir.path().join("repo"), false).unwrap();
    }

    #[test]
    fn a_readers_key_cannot_ship() {
        for versions in [&[1][..], &[1, 2]] {
            let a = point("a", 1, None);
            let (dir, r) = run_session(false, false, &[], |mut c, _| async move {
                // No Welcome, no list of points.
                assert!(hello_as(&mut c, versions, p::SessionKind::Ship)
                    .await
                    .is_err());
                // Whatever it sends next is not read.
                let _ = p::write_frame(&mut c, Kind::Commit, &[&a.manifest], T).await;
            });
            let e = r.unwrap_err();
            assert_eq!(error_code(&e), "denied", "{e:#}");
            assert!(format!("{e}").contains("--allow-reader"), "{e}");
            let store = LocalDir::open(&dir.path().join("repo")).unwrap();
            assert!(store.list_manifests().unwrap().is_empty());
        }
    }

    #[test]
    fn a_read_session_never_writes() {
        let a = point("a", 1, None);
        let (dir, r) = run_session(true, false, &[], |mut c, _| async move {
            hello_as(&mut c, &[2], p::SessionKind::Read)
                .await
                .unwrap()
                .expect(Kind::Welcome)
                .unwrap();
            let _ = send_chunks(&mut c, &a.chunks).await;
        });
        let e = r.unwrap_err();
        assert_eq!(error_code(&e), "violation", "{e:#}");
        let store = LocalDir::open(&dir.path().join("repo")).unwrap();
        let a = point("a", 1, None);
        assert!(!store.has_chunk(&a.chunks[0].0).unwrap());
    }

    #[test]
    fn a_read_session_needs_version_2() {
        let (_dir, r) = run_session(true, false, &[], |mut c, _| async move {
            assert!(hello_as(&mut c, &[1], p::SessionKind::Read).await.is_err());
        });
        assert_eq!(error_code(&r.unwrap_err()), "violation");
    }
}
