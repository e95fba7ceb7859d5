//! The reading side of protocol version 2: a standby host's repository as a
//! [`StoreRead`], for `bkimg list/info/verify/restore/export --repo bkimg://HOST:PORT` and
//! for the recovery system. Nothing the standby sends is trusted: this module checks the
//! frames (lengths, ids, index parts), and the readers above it ([`Repository`]) check
//! every chunk, index and manifest against its digest, as for any store.
//!
//! The store traits are synchronous and restore reads chunks from many threads at once:
//! the store keeps a small pool of TLS connections (one read session each, one request in
//! flight on each), opened as needed up to [`ReaderConfig::connections`]. A request that
//! fails because its connection broke is retried on a new connection, with backoff; an
//! object the standby does not hold is an answer ("not found"), never retried.
//!
//! [`Repository`]: bkimg_format::repo::Repository

use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bkimg_format::manifest::valid_id;
use bkimg_format::store::StoreRead;
use bkimg_format::{Digest, FormatError};
use tokio::net::TcpStream;

use super::client::{attach_seen, classify_refusal, connect_tls, transient, ClientConfig};
use super::protocol::{self as p, Frame, Kind, PeerError};
use super::tls::{Fingerprint, Identity, Seen};
use crate::RemoteError;

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

/// Connections (requests in flight) a store opens at most unless told otherwise.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// Further attempts of a failed request unless told otherwise.
pub const DEFAULT_RETRIES: u32 = 4;
/// Silence after which a connection counts as dead unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is closed rather than reused: the standby drops silent
/// peers (after its --timeout), and a request on a dropped connection costs a retry.
const IDLE_MAX: Duration = Duration::from_secs(5);
/// The chunk read at which the test hook `standby-read-chunk` pauses every chunk read.
const HOOK_AT: u64 = 8;

/// Told about events worth a line on a terminal (a retry after a broken connection).
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

/// How to reach and read a standby.
#[derive(Clone)]
pub struct ReaderConfig {
    /// HOST:PORT of the standby.
    pub address: String,
    /// This host's key and certificate; the standby must allow the certificate's
    /// fingerprint (`--allow-reader` or `--allow`).
    pub identity: Identity,
    /// The standby's certificate fingerprint (pinned).
    pub server_fingerprint: Fingerprint,
    /// Further attempts of a request after a broken or failed connection, waiting 1, 2,
    /// 4... s (at most 30 s) between them.
    pub retries: u32,
    /// No progress for this long means the connection is dead.
    pub timeout: Duration,
    /// Connections open at once at most: requests in flight.
    pub connections: usize,
    /// Told about each retry; None: silent.
    pub notify: Option<Notify>,
}

impl ReaderConfig {
    /// The standby `url` names (`bkimg://HOST:PORT`), with the default retries, timeout
    /// and connections and no notifications.
    pub fn new(
        url: &str,
        identity: Identity,
        server_fingerprint: Fingerprint,
    ) -> Result<ReaderConfig> {
        Ok(ReaderConfig {
            address: ClientConfig::address_of(url)?,
            identity,
            server_fingerprint,
            retries: DEFAULT_RETRIES,
            timeout: DEFAULT_TIMEOUT,
            connections: DEFAULT_CONNECTIONS,
            notify: None,
        })
    }
}

/// A standby host's repository, read over the network (protocol version 2).
pub struct StandbyStore {
    inner: Arc<Inner>,
}

impl StandbyStore {
    /// Connects to the standby `url` (`bkimg://HOST:PORT`) with the key in `key_dir` (as
    /// made by `bkimg standby keygen`), pinning `server_fingerprint` (64 hex digits, as
    /// `bkimg standby fingerprint` prints on the standby).
    pub fn open(url: &str, key_dir: &Path, server_fingerprint: &str) -> Result<StandbyStore> {
        let identity = Identity::load(key_dir)?;
        StandbyStore::connect(ReaderConfig::new(
            url,
            identity,
            Fingerprint::parse(server_fingerprint)?,
        )?)
    }

    /// As [`open`](StandbyStore::open), with the key and certificate given as PEM text
    /// (the contents of `standby.key` and `standby.crt`).
    pub fn open_pem(
        url: &str,
        key_pem: &str,
        cert_pem: &str,
        server_fingerprint: &str,
    ) -> Result<StandbyStore> {
        let identity = Identity::from_pem(key_pem, cert_pem)?;
        StandbyStore::connect(ReaderConfig::new(
            url,
            identity,
            Fingerprint::parse(server_fingerprint)?,
        )?)
    }

    /// Connects once (with the configured retries), so that a refused key, a wrong
    /// fingerprint, a standby that is down or one too old to serve reads is reported here
    /// rather than halfway through a command. Must not be called from async code (the store
    /// blocks on its own runtime).
    pub fn connect(mut cfg: ReaderConfig) -> Result<StandbyStore> {
        cfg.connections = cfg.connections.max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bkimg-standby")
            .enable_all()
            .build()
            .context("starting the I/O runtime")?;
        let store = StandbyStore {
            inner: Arc::new(Inner {
                hooked: std::env::var_os("BKIMG_TEST_PAUSE").is_some(),
                cfg,
                rt,
                pool: Mutex::new(Pool::default()),
                freed: Condvar::new(),
                last_note: Mutex::new(None),
                gate: Mutex::new(()),
                chunks_read: AtomicU64::new(0),
                version: AtomicU32::new(0),
            }),
        };
        let first = store.inner.with_retries("the repository", |inner| {
            let (conn, _) = inner.checkout().map_err(Attempt::fresh)?;
            inner.checkin(conn);
            Ok(())
        });
        if let Err(e) = first {
            // The failure itself (it names the standby), not "reading the repository".
            let e = match e {
                FormatError::Io { source, .. } if remote_in(&source) => {
                    let inner = source.into_inner().expect("checked");
                    anyhow::Error::from(*inner.downcast::<RemoteError>().expect("checked"))
                }
                FormatError::Io { source, .. } => anyhow::Error::from(source),
                other => other.into(),
            };
            return Err(e.context(format!("opening {}", store.url())));
        }
        Ok(store)
    }

    /// `bkimg://HOST:PORT`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The config file and key slots of the standby's repository (protocol version 3), so
    /// that a protected one can be unlocked and read through its key; `None` from a
    /// standby older than version 3, which holds no protected repository.
    pub fn repo_protection(&self) -> Result<Option<p::ConfigAndSlots>> {
        if self.inner.version.load(Ordering::Relaxed) < p::PROTECTED_VERSION {
            return Ok(None);
        }
        let what = "the repository config";
        let f = self
            .inner
            .request(what, Kind::GetConfig, &[], Kind::ConfigData)?
            .ok_or_else(|| {
                self.inner
                    .violation(what, "GetConfig answered \"not found\"".into())
            })?;
        let msg: p::RepoProtection = f
            .json()
            .map_err(|e| self.inner.violation(what, format!("{e:#}")))?;
        let decoded = msg
            .decode()
            .map_err(|e| self.inner.violation(what, format!("{e:#}")))?;
        Ok(Some(decoded))
    }
}

struct Inner {
    cfg: ReaderConfig,
    rt: tokio::runtime::Runtime,
    pool: Mutex<Pool>,
    /// Signalled when a connection is returned or closed.
    freed: Condvar,
    last_note: Mutex<Option<Instant>>,
    /// Test hook: whether BKIMG_TEST_PAUSE is set at all; every chunk read passes `gate`
    /// then, so that one paused read holds them all.
    hooked: bool,
    gate: Mutex<()>,
    chunks_read: AtomicU64,
    /// The protocol version the last new connection agreed.
    version: AtomicU32,
}

/// Connections not in use, with when each was last used, and how many are open.
#[derive(Default)]
struct Pool {
    idle: Vec<(Conn, Instant)>,
    open: usize,
}

/// A failed attempt: why, and whether it was on a connection reused from the pool (which
/// the standby may have dropped meanwhile: trying once more on another is free).
struct Attempt {
    error: anyhow::Error,
    reused: bool,
}

impl Attempt {
    fn fresh(error: anyhow::Error) -> Attempt {
        Attempt {
            error,
            reused: false,
        }
    }
}

/// The standby runs a bkimg from before read sessions.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct OldStandby(String);

/// Whether an I/O error carries a [`RemoteError`].
fn remote_in(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<RemoteError>())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn url(&self) -> String {
        format!("bkimg://{}", self.cfg.address)
    }

    /// Runs `once` until it succeeds, a failure is final, or the retries run out.
    fn with_retries<T>(
        &self,
        what: &str,
        mut once: impl FnMut(&Inner) -> Result<T, Attempt>,
    ) -> Result<T, FormatError> {
        let mut failures = 0u32;
        let mut free = 0usize;
        loop {
            let a = match once(self) {
                Ok(v) => return Ok(v),
                Err(a) => a,
            };
            if a.reused && free <= self.cfg.connections {
                free += 1;
                continue;
            }
            let e = classify_refusal(
                a.error,
                &self.cfg.address,
                &self.cfg.identity.fingerprint(),
                &self.cfg.server_fingerprint,
                "--allow-reader",
            );
            if !transient(&e) {
                return Err(self.final_error(what, e));
            }
            failures += 1;
            if failures > self.cfg.retries {
                let address = &self.cfg.address;
                return Err(self.remote(
                    what,
                    RemoteError::Unreachable(format!(
                        "standby {address}: {e:#}; gave up after {failures} attempt(s): check \
                         that `bkimg standby serve` runs there and listens on {address}, and \
                         that this host can reach it (address, firewall); then run the same \
                         command again"
                    )),
                ));
            }
            let wait = Duration::from_secs((1u64 << (failures - 1).min(5)).min(30));
            self.note(&format!(
                "standby {}: {e:#}; retrying in {} s (attempt {} of {})",
                self.cfg.address,
                wait.as_secs(),
                failures + 1,
                self.cfg.retries + 1
            ));
            std::thread::sleep(wait);
        }
    }

    /// A failure no retry mends, as the store traits report it.
    fn final_error(&self, what: &str, e: anyhow::Error) -> FormatError {
        for cause in e.chain() {
            if let Some(r) = cause.downcast_ref::<RemoteError>() {
                let r = match r {
                    RemoteError::Denied(m) => RemoteError::Denied(m.clone()),
                    RemoteError::Unreachable(m) => RemoteError::Unreachable(m.clone()),
                };
                return self.remote(what, r);
            }
            if let Some(PeerError::Reported { code, message }) = cause.downcast_ref() {
                if code == "damaged" {
                    return FormatError::corrupt(
                        format!("{what} on the standby {}", self.cfg.address),
                        format!("the standby could not read it: {message}"),
                    );
                }
            }
        }
        FormatError::io(
            format!("reading {what} from {}", self.url()),
            io::Error::other(format!("{e:#}")),
        )
    }

    fn remote(&self, what: &str, r: RemoteError) -> FormatError {
        FormatError::io(
            format!("reading {what} from {}", self.url()),
            io::Error::other(r),
        )
    }

    fn violation(&self, what: &str, detail: String) -> FormatError {
        FormatError::io(
            format!("reading {what} from {}", self.url()),
            io::Error::other(PeerError::Violation(detail)),
        )
    }

    fn note(&self, msg: &str) {
        let Some(notify) = &self.cfg.notify else {
            return;
        };
        // Every worker retries on its own: one line a second is enough.
        {
            let mut last = lock(&self.last_note);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        notify(msg);
    }

    /// A connection: an idle one (true), else a new one if fewer than the limit are open,
    /// else the next one returned.
    fn checkout(&self) -> Result<(Conn, bool)> {
        let mut stale = Vec::new();
        let mut pool = lock(&self.pool);
        let reused = loop {
            let now = Instant::now();
            let mut i = 0;
            while i < pool.idle.len() {
                if now.duration_since(pool.idle[i].1) > IDLE_MAX {
                    stale.push(pool.idle.swap_remove(i).0);
                    pool.open -= 1;
                } else {
                    i += 1;
                }
            }
            // The most recently used: the others age out when fewer are needed.
            if let Some(i) = (0..pool.idle.len()).max_by_key(|&i| pool.idle[i].1) {
                break Some(pool.idle.swap_remove(i).0);
            }
            if pool.open < self.cfg.connections {
                pool.open += 1;
                break None;
            }
            pool = self
                .freed
                .wait_timeout(pool, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(pool);
        if !stale.is_empty() {
            self.freed.notify_all();
            self.close(stale);
        }
        match reused {
            Some(c) => Ok((c, true)),
            None => match self.rt.block_on(open_session(&self.cfg)) {
                Ok((c, version)) => {
                    self.version.store(version, Ordering::Relaxed);
                    Ok((c, false))
                }
                Err(e) => {
                    self.release();
                    Err(e)
                }
            },
        }
    }

    fn checkin(&self, c: Conn) {
        lock(&self.pool).idle.push((c, Instant::now()));
        self.freed.notify_one();
    }

    /// Forgets a connection that failed.
    fn discard(&self, c: Conn) {
        drop(c);
        self.release();
    }

    fn release(&self) {
        lock(&self.pool).open -= 1;
        self.freed.notify_one();
    }

    /// Ends sessions politely (Bye, TLS close), not waiting long for a standby that may be
    /// gone.
    fn close(&self, conns: Vec<Conn>) {
        let t = Duration::from_secs(1);
        self.rt.block_on(async {
            for mut c in conns {
                let _ = tokio::time::timeout(t, async {
                    p::write_frame(&mut c, Kind::Bye, &[], t).await?;
                    p::flush(&mut c, t).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut c).await?;
                    anyhow::Ok(())
                })
                .await;
            }
        });
    }

    /// One request and its answer (None: the standby does not hold the object), with
    /// retries.
    fn request(
        &self,
        what: &str,
        kind: Kind,
        body: &[&[u8]],
        answer: Kind,
    ) -> Result<Option<Frame>, FormatError> {
        let t = self.cfg.timeout;
        self.with_retries(what, |inner| {
            let (mut c, reused) = inner.checkout().map_err(Attempt::fresh)?;
            match inner.rt.block_on(exchange(&mut c, kind, body, answer, t)) {
                Ok(a) => {
                    inner.checkin(c);
                    Ok(a)
                }
                Err(error) => {
                    inner.discard(c);
                    Err(Attempt { error, reused })
                }
            }
        })
    }

    /// A part of an index from `offset`: the index's length and the bytes.
    fn index_part(&self, id: &Digest, offset: u64) -> Result<Option<(u64, Vec<u8>)>, FormatError> {
        let what = format!("volume index {id}");
        let Some(f) = self.request(
            &what,
            Kind::GetIndex,
            &[&p::get_index(id, offset)],
            Kind::IndexData,
        )?
        else {
            return Ok(None);
        };
        let total = p::parse_index_data(&f.body, offset)
            .map_err(|e| self.violation(&what, format!("{e:#}")))?
            .0;
        let mut data = f.body;
        data.drain(..8);
        Ok(Some((total, data)))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let idle: Vec<Conn> = lock(&self.pool).idle.drain(..).map(|(c, _)| c).collect();
        self.close(idle);
    }
}

/// A new connection with its read session open.
async fn open_session(cfg: &ReaderConfig) -> Result<(Conn, u32)> {
    let seen = Seen::default();
    let t = cfg.timeout;
    let result = async {
        let mut s = connect_tls(
            &cfg.address,
            &cfg.identity,
            &cfg.server_fingerprint,
            t,
            &seen,
        )
        .await?;
        let hello = p::Hello {
            protocol: p::PROTOCOL.into(),
            versions: p::VERSIONS
                .iter()
                .copied()
                .filter(|&v| v >= p::READ_VERSION)
                .collect(),
            software: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
            session: p::SessionKind::Read,
        };
        p::write_json(&mut s, Kind::Hello, &hello, t).await?;
        p::flush(&mut s, t).await?;
        let f = p::read_frame(&mut s, t).await?;
        if f.kind == Kind::Error {
            let e: p::ErrorMsg = f.json()?;
            if e.code == "unsupported" {
                return Err(OldStandby(format!(
                    "standby {} cannot serve reads ({}): upgrade bkimg on the standby",
                    cfg.address, e.message
                ))
                .into());
            }
        }
        let welcome: p::Welcome = f.expect(Kind::Welcome)?.json()?;
        if welcome.version < p::READ_VERSION {
            // A version-1 standby ignores the session kind and picks version 1.
            return Err(OldStandby(format!(
                "standby {} runs {}, which speaks standby protocol version {} only and \
                 cannot serve reads: upgrade bkimg on the standby",
                cfg.address, welcome.software, welcome.version
            ))
            .into());
        }
        if !p::VERSIONS.contains(&welcome.version) {
            return Err(PeerError::Violation(format!(
                "the standby chose protocol version {} which was not offered",
                welcome.version
            ))
            .into());
        }
        Ok((s, welcome.version))
    }
    .await;
    result.map_err(|e| attach_seen(e, &seen))
}

/// Sends a request; reads its answer.
async fn exchange(
    c: &mut Conn,
    kind: Kind,
    body: &[&[u8]],
    answer: Kind,
    t: Duration,
) -> Result<Option<Frame>> {
    p::write_frame(c, kind, body, t).await?;
    p::flush(c, t).await?;
    let f = p::read_frame(c, t).await?;
    if f.kind == Kind::NotFound {
        return Ok(None);
    }
    f.expect(answer).map(Some)
}

impl StoreRead for StandbyStore {
    fn location(&self) -> String {
        self.url()
    }

    fn list_manifests(&self) -> bkimg_format::Result<Vec<String>> {
        let what = "the list of restore points";
        let f = self
            .inner
            .request(what, Kind::List, &[], Kind::Listing)?
            .ok_or_else(|| {
                self.inner
                    .violation(what, "List answered \"not found\"".into())
            })?;
        let listing: p::Listing = f
            .json()
            .map_err(|e| self.inner.violation(what, format!("{e:#}")))?;
        let mut ids = listing.ids;
        if let Some(bad) = ids.iter().find(|id| !valid_id(id)) {
            return Err(self
                .inner
                .violation(what, format!("{bad:?} is not a restore point id")));
        }
        ids.sort();
        Ok(ids)
    }

    fn read_manifest(&self, id: &str) -> bkimg_format::Result<Vec<u8>> {
        if !valid_id(id) {
            return Err(FormatError::missing(format!("restore point {id:?}")));
        }
        let what = format!("restore point {id}");
        match self.inner.request(
            &what,
            Kind::GetManifest,
            &[id.as_bytes()],
            Kind::ManifestData,
        )? {
            Some(f) => Ok(f.body),
            None => Err(FormatError::missing(format!(
                "{what} on the standby {}",
                self.inner.cfg.address
            ))),
        }
    }

    fn open_index(&self, id: &Digest) -> bkimg_format::Result<Box<dyn Read + Send>> {
        // The first part now, so that a missing index is reported as one.
        let Some((total, first)) = self.inner.index_part(id, 0)? else {
            return Err(FormatError::missing(format!(
                "volume index {id} on the standby {}",
                self.inner.cfg.address
            )));
        };
        Ok(Box::new(IndexReader {
            inner: self.inner.clone(),
            id: *id,
            total,
            next: first.len() as u64,
            buf: first,
            at: 0,
        }))
    }

    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> bkimg_format::Result<()> {
        if self.inner.hooked {
            let n = self.inner.chunks_read.fetch_add(1, Ordering::Relaxed);
            let _gate = lock(&self.inner.gate);
            if n == HOOK_AT {
                bkimg_format::testhook::pause("standby-read-chunk");
            }
        }
        let what = format!("chunk {digest}");
        match self
            .inner
            .request(&what, Kind::GetChunk, &[&digest.0], Kind::ChunkData)?
        {
            Some(f) => {
                *out = f.body;
                Ok(())
            }
            None => Err(FormatError::missing(format!(
                "{what} on the standby {}",
                self.inner.cfg.address
            ))),
        }
    }

    fn has_chunk(&self, digest: &Digest) -> bkimg_format::Result<bool> {
        Ok(self.has_chunks(std::slice::from_ref(digest))?[0])
    }

    fn has_chunks(&self, digests: &[Digest]) -> bkimg_format::Result<Vec<bool>> {
        let what = "which chunks are stored";
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(p::QUERY_MAX) {
            let f = self
                .inner
                .request(what, Kind::Query, &[&p::pack_digests(batch)], Kind::Lacks)?
                .ok_or_else(|| {
                    self.inner
                        .violation(what, "Query answered \"not found\"".into())
                })?;
            if f.body.len() != batch.len() || f.body.iter().any(|&b| b > 1) {
                return Err(self.inner.violation(
                    what,
                    format!("{} answers to {} questions", f.body.len(), batch.len()),
                ));
            }
            out.extend(f.body.iter().map(|&lacks| lacks == 0));
        }
        Ok(out)
    }

    fn read_prune_record(&self, id: &str) -> bkimg_format::Result<Option<Vec<u8>>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let what = format!("the prune record of {id}");
        Ok(self
            .inner
            .request(
                &what,
                Kind::GetPruneRecord,
                &[id.as_bytes()],
                Kind::PruneRecordData,
            )?
            .map(|f| f.body))
    }
}

/// An index read in parts of at most [`p::INDEX_PART_MAX`] bytes, each asked for when the
/// one before is used up (on whichever connection is free).
struct IndexReader {
    inner: Arc<Inner>,
    id: Digest,
    total: u64,
    /// Offset of the byte after `buf`.
    next: u64,
    buf: Vec<u8>,
    at: usize,
}

impl Read for IndexReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.next >= self.total {
                return Ok(0);
            }
            match self.inner.index_part(&self.id, self.next) {
                Ok(Some((total, data))) if total == self.total => {
                    self.next += data.len() as u64;
                    self.buf = data;
                    self.at = 0;
                }
                Ok(Some((total, _))) => {
                    return Err(io::Error::other(PeerError::Violation(format!(
                        "volume index {} was {} bytes long, then {total}",
                        self.id, self.total
                    ))))
                }
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "volume index {} disappeared from the standby {} while being read \
                             (pruned there?)",
                            self.id, self.inner.cfg.address
                        ),
                    ))
                }
                // The remote failure itself, so that callers still tell it apart.
                Err(FormatError::Io { source, .. }) => return Err(source),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        super::super::tls::keygen(dir.path()).unwrap();
        let id = Identity::load(dir.path()).unwrap();
        (dir, id)
    }

    #[test]
    fn a_standby_that_is_down_is_unreachable_and_named() {
        // A port nothing listens on: bound by us, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (_dir, id) = identity();
        let fp = id.fingerprint();
        let url = format!("bkimg://127.0.0.1:{port}");
        let mut cfg = ReaderConfig::new(&url, id, fp).unwrap();
        cfg.retries = 0;
        let notes = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = notes.clone();
        cfg.notify = Some(Arc::new(move |m: &str| lock(&seen).push(m.to_string())));
        let e = StandbyStore::connect(cfg).err().unwrap();
        let r = crate::remote_error(&e).expect("a remote error");
        assert!(matches!(r, RemoteError::Unreachable(_)), "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("bkimg standby serve"), "{msg}");
        // No retries asked for: nothing noted.
        assert!(lock(&notes).is_empty());
    }

    #[test]
    fn urls_and_keys_are_checked_before_connecting() {
        let (dir, id) = identity();
        let fp = id.fingerprint();
        assert!(ReaderConfig::new("s3://bucket", id.clone(), fp.clone()).is_err());
        assert!(ReaderConfig::new("bkimg://host", id, fp.clone()).is_err());
        let e = StandbyStore::open("bkimg://127.0.0.1:1", dir.path(), "not-hex")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("fingerprint"), "{e:#}");
        let e = StandbyStore::open_pem("bkimg://127.0.0.1:1", "", "", &fp.0)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("PEM"), "{e:#}");
    }
}
