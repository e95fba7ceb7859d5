//! Listing and deleting in a bucket for `bkimg prune --repo s3://...`, and the advisory
//! locks that keep a prune and a replication to the same prefix apart (spec/s3-layout.md
//! §7).
//!
//! S3 has no atomic create-if-absent that every server honours, so the locks are two
//! flags: each side writes its own lock object, then lists the others. S3 lists what was
//! written before (strong read-after-write consistency), so of two that start together at
//! least one sees the other and backs off; neither relies on conditional writes. A lock is
//! rewritten every [`REFRESH`] while held; one not rewritten for [`STALE_AFTER`] belongs to
//! a process that died and is ignored (and removed by the next prune).

use std::time::{Duration, SystemTime};

use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use bkimg_format::manifest::valid_id;
use bkimg_format::store::{names, ChunkBatchFn, StoreMaintain};
use bkimg_format::{sealed, Digest, FormatError};

use super::{get_error, GetError, Res, S3Store};

const LOCKS: &str = "locks";
pub const REFRESH: Duration = Duration::from_secs(120);
pub const STALE_AFTER: Duration = Duration::from_secs(900);

/// What a lock holder does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// `bkimg replicate`: writes, never deletes. Any number may run together.
    Ship,
    /// `bkimg prune`: deletes. Runs alone.
    Prune,
}

impl LockKind {
    fn name(self) -> &'static str {
        match self {
            LockKind::Ship => "ship",
            LockKind::Prune => "prune",
        }
    }
}

/// Held while a replication or prune runs; dropping it stops the refresh and deletes the
/// lock object.
pub struct S3Lock<'a> {
    store: &'a S3Store,
    key: String,
    refresh: tokio::task::JoinHandle<()>,
}

impl Drop for S3Lock<'_> {
    fn drop(&mut self) {
        self.refresh.abort();
        *self.store.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = self.store.delete_key(&self.key);
    }
}

/// What a held lock guarantees, for the store's commits and deletions to check.
pub(crate) struct Lease {
    kind: LockKind,
    /// The server's time (LastModified, Unix seconds) of the lock's first write: when
    /// this holder started, on the server's clock.
    started: i64,
    /// The last time (this host's monotonic clock) the lock object was written.
    renewed: std::sync::Mutex<std::time::Instant>,
}

/// A lock not renewed for this long may already count as stale to others (who wait
/// [`STALE_AFTER`] on their own side of the network): stop before writing more.
const LEASE: Duration = Duration::from_secs(STALE_AFTER.as_secs() - 2 * REFRESH.as_secs());

impl Lease {
    fn lapsed(&self) -> Option<Duration> {
        let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        let since = renewed.elapsed();
        (since > LEASE).then_some(since)
    }
}

impl S3Store {
    /// Takes a lock of `kind`, or says who holds the one in the way
    /// ([`FormatError::Busy`]). `wait` retries every 10 s for up to [`STALE_AFTER`].
    pub fn lock(&self, kind: LockKind, wait: bool) -> bkimg_format::Result<S3Lock<'_>> {
        let started = SystemTime::now();
        loop {
            match self.try_lock(kind)? {
                Ok(lock) => return Ok(lock),
                Err(holder) => {
                    let waited = started.elapsed().unwrap_or_default();
                    if !wait || waited > STALE_AFTER {
                        return Err(FormatError::Busy(format!(
                            "{} is in use: {holder}; run the command again when it has \
                             finished{}",
                            self.url(),
                            if wait { "" } else { " (or add --wait)" }
                        )));
                    }
                    std::thread::sleep(Duration::from_secs(10));
                }
            }
        }
    }

    fn try_lock(
        &self,
        kind: LockKind,
    ) -> bkimg_format::Result<std::result::Result<S3Lock<'_>, String>> {
        let what = || format!("the locks of {}", self.url());
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        let name = format!("{}-{}", kind.name(), uuid::Uuid::new_v4().simple());
        let key = format!("{}{LOCKS}/{name}", self.prefix);
        let body = serde_json::json!({
            "kind": kind.name(),
            "host": host,
            "pid": std::process::id(),
        })
        .to_string()
        .into_bytes();
        let written = std::time::Instant::now();
        self.put_unretained(&key, body.clone())
            .map_err(|f| f.into_format(what()))?;
        let locks = self.list_locks().map_err(|f| f.into_format(what()))?;
        let started = locks
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.modified)
            .ok_or_else(|| {
                FormatError::io(
                    what(),
                    std::io::Error::other(format!(
                        "the lock just written ({LOCKS}/{name}) is not listed: the server does \
                         not list what it stored"
                    )),
                )
            })?;
        let lease = std::sync::Arc::new(Lease {
            kind,
            started,
            renewed: std::sync::Mutex::new(written),
        });
        let lock = S3Lock {
            store: self,
            key: key.clone(),
            refresh: self.rt.spawn(refresh(
                self.client.clone(),
                self.names.bucket.clone(),
                key,
                body,
                lease.clone(),
            )),
        };
        for LockEntry {
            name: other, age, ..
        } in locks
        {
            if other == name || age > STALE_AFTER {
                continue;
            }
            let other_kind = other.split('-').next().unwrap_or("");
            if kind == LockKind::Prune || other_kind == LockKind::Prune.name() {
                let holder = if other_kind == LockKind::Prune.name() {
                    "a prune is running on it"
                } else {
                    "a replication is writing to it"
                };
                drop(lock);
                return Ok(Err(format!("{holder} (lock {LOCKS}/{other})")));
            }
        }
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
        Ok(Ok(lock))
    }

    /// Refuses to go on when the lock this process holds could not be renewed for so long
    /// that another may have taken it for a dead process's.
    pub(crate) fn check_lease(&self) -> bkimg_format::Result<()> {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        match lease.as_ref().and_then(|l| l.lapsed()) {
            None => Ok(()),
            Some(since) => Err(FormatError::Busy(format!(
                "the lock on {} was not renewed for {} s (the server did not take the \
                 rewrite): another process may have taken it for stale, so nothing more is \
                 written or deleted; run the command again",
                self.url(),
                since.as_secs()
            ))),
        }
    }

    /// When a prune this process runs started, on the server's clock.
    fn prune_started(&self) -> Option<i64> {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        lease
            .as_ref()
            .filter(|l| l.kind == LockKind::Prune)
            .map(|l| l.started)
    }

    /// The locks with their age on the server's clock: how much older each is than the
    /// newest lock written (a caller lists right after writing or renewing its own, so
    /// that is about the server's "now"). The local clock plays no part: a host whose
    /// clock is off by an hour sees the same ages as every other.
    fn list_locks(&self) -> Res<Vec<LockEntry>> {
        let listed = self.list_with_times(&format!("{LOCKS}/"))?;
        let newest = listed.iter().map(|(_, m)| *m).max().unwrap_or(0);
        Ok(listed
            .into_iter()
            .map(|(name, modified)| LockEntry {
                name,
                modified,
                age: Duration::from_secs(newest.saturating_sub(modified).max(0) as u64),
            })
            .collect())
    }

    /// Removes locks of processes that died (not rewritten for [`STALE_AFTER`]).
    pub fn remove_stale_locks(&self) -> bkimg_format::Result<usize> {
        let what = || format!("the locks of {}", self.url());
        let mut n = 0;
        self.check_lease()?;
        for LockEntry { name, age, .. } in self.list_locks().map_err(|f| f.into_format(what()))? {
            if age > STALE_AFTER {
                self.delete_key(&format!("{}{LOCKS}/{name}", self.prefix))
                    .map_err(|f| f.into_format(what()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn delete_key(&self, key: &str) -> Res<()> {
        self.count();
        match self.rt.block_on(
            self.client
                .delete_object()
                .bucket(&self.names.bucket)
                .key(key)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(e) {
                super::Failure::NotFound => Ok(()),
                other => Err(deletes_refused(other)),
            },
        }
    }

    /// Deletes up to 1000 keys in one request.
    fn delete_keys(&self, keys: &[String]) -> Res<()> {
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| super::Failure::Other(e.to_string()))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| super::Failure::Other(e.to_string()))?;
        self.count();
        let out = self
            .rt
            .block_on(
                self.client
                    .delete_objects()
                    .bucket(&self.names.bucket)
                    .delete(delete)
                    .send(),
            )
            .map_err(|e| deletes_refused(self.classify(e)))?;
        if let Some(e) = out.errors().first() {
            let m = format!(
                "deleting {}: {} ({})",
                e.key().unwrap_or("?"),
                e.message().unwrap_or("no message"),
                e.code().unwrap_or("no code"),
            );
            return Err(if e.code() == Some("AccessDenied") {
                deletes_refused(super::Failure::Denied(m))
            } else {
                super::Failure::Other(m)
            });
        }
        Ok(())
    }

    fn key_prune_record(&self, id: &str) -> String {
        format!("{}{}", self.prefix, names::prune_record(id))
    }
}

/// A lock object as listed.
struct LockEntry {
    name: String,
    /// LastModified, Unix seconds (server's clock).
    modified: i64,
    age: Duration,
}

/// Rewrites the lock object every [`REFRESH`] so that others see it is alive, and notes
/// each rewrite the server took (a failed one is retried at the next turn; the holder
/// stops writing once the lock may have lapsed: [`S3Store::check_lease`]).
async fn refresh(
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    body: Vec<u8>,
    lease: std::sync::Arc<Lease>,
) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let sent = std::time::Instant::now();
        let ok = client
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(body.clone().into())
            .send()
            .await
            .is_ok();
        if ok {
            *lease.renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent;
        }
    }
}

impl S3Store {
    pub(crate) fn read_prune_record_object(
        &self,
        id: &str,
    ) -> bkimg_format::Result<Option<Vec<u8>>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let what = format!("prune record of {id}");
        let max = sealed::MAX_BODY_LEN + 64;
        match self.get(&self.key_prune_record(id), max, &what) {
            Ok(b) => Ok(Some(b)),
            Err(GetError::Remote(super::Failure::NotFound)) => Ok(None),
            Err(e) => Err(get_error(e, what, max)),
        }
    }
}

impl StoreMaintain for S3Store {
    fn list_indexes(&self) -> bkimg_format::Result<Vec<Digest>> {
        Ok(self
            .index_ids()
            .map_err(|f| f.into_format(format!("the indexes of {}", self.url())))?
            .into_iter()
            .collect())
    }

    fn scan_chunks(&self, each: &mut ChunkBatchFn<'_>) -> bkimg_format::Result<()> {
        let what = || format!("the chunks of {}", self.url());
        let mut batch = Vec::new();
        let mut failed = None;
        // A chunk stored after this prune began may belong to a replication that started
        // meanwhile: never offered for deletion (a later prune judges it).
        let newer_than = self.prune_started().unwrap_or(i64::MAX);
        self.list_objects(&format!("{}/", names::CHUNKS), &mut |page| {
            batch.clear();
            for o in page.iter().filter(|o| o.modified < newer_than) {
                let Some((fan, hex)) = o.key.split_once('/') else {
                    continue;
                };
                if !hex.starts_with(fan) {
                    continue;
                }
                if let Some(d) = Digest::from_hex(hex) {
                    batch.push((d, o.size));
                }
            }
            if let Err(e) = each(&batch) {
                failed = Some(e);
                return false;
            }
            true
        })
        .map_err(|f| f.into_format(what()))?;
        failed.map_or(Ok(()), Err)
    }

    fn list_prune_records(&self) -> bkimg_format::Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .list(&format!("{}/", names::PRUNED))
            .map_err(|f| f.into_format(format!("the prune records of {}", self.url())))?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| valid_id(k))
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn put_prune_record(&self, id: &str, bytes: &[u8]) -> bkimg_format::Result<()> {
        self.check_lease()?;
        self.put(&self.key_prune_record(id), bytes.to_vec())
            .map_err(|f| f.into_format_doing("writing", format!("prune record of {id}")))
    }

    fn delete_manifest(&self, id: &str) -> bkimg_format::Result<()> {
        self.check_lease()?;
        self.delete_key(&self.key_point(id))
            .map_err(|f| f.into_format_doing("deleting", format!("restore point {id}")))
    }

    fn delete_index(&self, id: &Digest) -> bkimg_format::Result<()> {
        self.check_lease()?;
        self.delete_key(&self.key_index(id))
            .map_err(|f| f.into_format_doing("deleting", format!("volume index {id}")))
    }

    fn delete_chunks(&self, digests: &[Digest]) -> bkimg_format::Result<()> {
        self.check_lease()?;
        for group in digests.chunks(1000) {
            let keys: Vec<String> = group.iter().map(|d| self.key_chunk(d)).collect();
            self.delete_keys(&keys)
                .map_err(|f| f.into_format_doing("deleting", format!("{} chunks", keys.len())))?;
        }
        let mut set = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = set.as_mut() {
            for d in digests {
                s.remove(d);
            }
        }
        Ok(())
    }

    fn delete_prune_record(&self, id: &str) -> bkimg_format::Result<()> {
        self.check_lease()?;
        self.delete_key(&self.key_prune_record(id))
            .map_err(|f| f.into_format_doing("deleting", format!("prune record of {id}")))
    }
}

/// A delete the bucket refused: say what that usually means.
fn deletes_refused(f: super::Failure) -> super::Failure {
    match f {
        super::Failure::Denied(m) => super::Failure::Denied(format!(
            "{m}; these credentials may not delete (an append-only client, \
             docs/replication-s3.md): prune with an administrator's credentials"
        )),
        other => other,
    }
}
