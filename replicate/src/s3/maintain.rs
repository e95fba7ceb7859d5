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

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
        let _ = self.store.delete_key(&self.key);
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
        self.put_unretained(&key, body.clone())
            .map_err(|f| f.into_format(what()))?;
        let lock = S3Lock {
            store: self,
            key: key.clone(),
            refresh: self.rt.spawn(refresh(
                self.client.clone(),
                self.names.bucket.clone(),
                key,
                body,
            )),
        };
        for (other, age) in self.list_locks().map_err(|f| f.into_format(what()))? {
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
        Ok(Ok(lock))
    }

    /// Lock names with their age.
    fn list_locks(&self) -> Res<Vec<(String, Duration)>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Ok(self
            .list_with_times(&format!("{LOCKS}/"))?
            .into_iter()
            .map(|(k, modified)| {
                let age = Duration::from_secs(now.saturating_sub(modified).max(0) as u64);
                (k, age)
            })
            .collect())
    }

    /// Removes locks of processes that died (not rewritten for [`STALE_AFTER`]).
    pub fn remove_stale_locks(&self) -> bkimg_format::Result<usize> {
        let what = || format!("the locks of {}", self.url());
        let mut n = 0;
        for (name, age) in self.list_locks().map_err(|f| f.into_format(what()))? {
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
                other => Err(other),
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
            .map_err(|e| self.classify(e))?;
        if let Some(e) = out.errors().first() {
            return Err(super::Failure::Other(format!(
                "deleting {}: {} ({})",
                e.key().unwrap_or("?"),
                e.message().unwrap_or("no message"),
                e.code().unwrap_or("no code"),
            )));
        }
        Ok(())
    }

    fn key_prune_record(&self, id: &str) -> String {
        format!("{}{}", self.prefix, names::prune_record(id))
    }
}

/// Rewrites the lock object every [`REFRESH`] so that others see it is alive.
async fn refresh(client: aws_sdk_s3::Client, bucket: String, key: String, body: Vec<u8>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let _ = client
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(body.clone().into())
            .send()
            .await;
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
        self.list_objects(&format!("{}/", names::CHUNKS), &mut |page| {
            batch.clear();
            for o in page {
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
        self.put(&self.key_prune_record(id), bytes.to_vec())
            .map_err(|f| f.into_format(format!("prune record of {id}")))
    }

    fn delete_manifest(&self, id: &str) -> bkimg_format::Result<()> {
        self.delete_key(&self.key_point(id))
            .map_err(|f| f.into_format(format!("restore point {id}")))
    }

    fn delete_index(&self, id: &Digest) -> bkimg_format::Result<()> {
        self.delete_key(&self.key_index(id))
            .map_err(|f| f.into_format(format!("volume index {id}")))
    }

    fn delete_chunks(&self, digests: &[Digest]) -> bkimg_format::Result<()> {
        for group in digests.chunks(1000) {
            let keys: Vec<String> = group.iter().map(|d| self.key_chunk(d)).collect();
            self.delete_keys(&keys)
                .map_err(|f| f.into_format(format!("{} chunks", keys.len())))?;
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
        self.delete_key(&self.key_prune_record(id))
            .map_err(|f| f.into_format(format!("prune record of {id}")))
    }
}
