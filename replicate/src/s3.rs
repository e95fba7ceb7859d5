//! A repository in an S3 bucket (`s3://BUCKET[/PREFIX]`, layout in spec/s3-layout.md):
//! the same objects under the same names as a local repository directory, so every reader
//! works on it through [`StoreRead`], and `bkimg replicate` fills it ([`replicate`]).
//!
//! The store traits are synchronous (capture and restore run plain threads): the store
//! holds its own tokio runtime and every call blocks on it, from as many threads at once
//! as the caller likes; requests of different threads overlap.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled, ObjectLockMode,
};
use aws_sdk_s3::Client;
use bkimg_format::chunk;
use bkimg_format::manifest::valid_id;
use bkimg_format::sealed;
use bkimg_format::store::local::{parse_config, RepoConfig};
use bkimg_format::store::names;
use bkimg_format::store::{StoreRead, StoreWrite};
use bkimg_format::{Digest, FormatError};

use crate::RemoteError;

mod maintain;
mod ship;

pub use maintain::{LockKind, S3Lock};
pub use ship::{replicate, resend_chunks};

/// Objects at least this large are uploaded in parts of this size (indexes of big
/// volumes); smaller ones in one PUT. Chunk blobs are always one PUT.
pub const PART_SIZE: usize = 16 << 20;
/// S3 allows at most 10 000 parts; parts grow beyond [`PART_SIZE`] for huge objects.
const MAX_PARTS: u64 = 10_000;
/// Keys per ListObjectsV2 page (the S3 maximum).
const LIST_PAGE: i32 = 1000;

/// Why a request failed, in the terms callers branch on.
#[derive(Debug)]
pub enum Failure {
    /// The key does not exist (404, NoSuchKey).
    NotFound,
    /// The bucket does not exist.
    NoBucket(String),
    Denied(String),
    Unreachable(String),
    Other(String),
}

impl Failure {
    /// For `bkimg replicate` and `open`: typed so the exit code comes out right.
    pub fn into_anyhow(self, what: &str) -> anyhow::Error {
        match self {
            Failure::NotFound => FormatError::missing(what.to_string()).into(),
            Failure::NoBucket(m) => FormatError::NotRepository(m).into(),
            Failure::Denied(m) => RemoteError::Denied(m).into(),
            Failure::Unreachable(m) => RemoteError::Unreachable(m).into(),
            Failure::Other(m) => anyhow::anyhow!("{what}: {m}"),
        }
    }

    /// For the store traits: missing objects are `Missing`, the rest I/O errors that
    /// carry the remote error as their source.
    fn into_format(self, what: impl Into<String>) -> FormatError {
        let what = what.into();
        self.into_format_doing("reading", what)
    }

    /// [`into_format`](Self::into_format) for what was being done to `what` (e.g.
    /// "deleting").
    fn into_format_doing(self, doing: &str, what: String) -> FormatError {
        match self {
            Failure::NotFound => FormatError::missing(what),
            Failure::NoBucket(m) => FormatError::NotRepository(m),
            Failure::Denied(m) => FormatError::io(
                format!("{doing} {what}"),
                io::Error::other(RemoteError::Denied(m)),
            ),
            Failure::Unreachable(m) => FormatError::io(
                format!("{doing} {what}"),
                io::Error::other(RemoteError::Unreachable(m)),
            ),
            Failure::Other(m) => FormatError::io(format!("{doing} {what}"), io::Error::other(m)),
        }
    }
}

type Res<T> = std::result::Result<T, Failure>;

/// One object of a listing: its key relative to the store's prefix, size and
/// last-modified time (Unix seconds).
pub(crate) struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: i64,
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix with a trailing '/' or empty).
pub fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| anyhow::anyhow!("{url:?} is not an s3://BUCKET[/PREFIX] location"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !valid_bucket {
        anyhow::bail!("{url:?}: {bucket:?} is not a valid bucket name (3-63 of a-z 0-9 . - _)");
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p == "." || p == "..") {
        anyhow::bail!("{url:?}: the prefix must not contain . or .. components");
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_string(), prefix))
}

/// Retention put on every object uploaded (S3 Object Lock, COMPLIANCE mode).
#[derive(Clone, Copy, Debug)]
pub struct ObjectLock {
    pub days: u32,
}

/// How to reach S3 besides the standard AWS configuration chain.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    /// Endpoint URL that overrides the chain (`--endpoint`).
    pub endpoint: Option<String>,
    /// Endpoint URL used when the chain names none (the config file's).
    pub fallback_endpoint: Option<String>,
    /// Region used when the chain names none (else us-east-1).
    pub fallback_region: Option<String>,
}

pub struct S3Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    names: Names,
    prefix: String,
    lock: Option<ObjectLock>,
    part_size: usize,
    /// Chunks the bucket holds: listed once on first need, then kept up to date with what
    /// this process stores.
    /// The chunks listed in the bucket, with their sizes (loaded once).
    chunks: Mutex<Option<HashMap<Digest, u64>>>,
    scratch_seq: AtomicU64,
    /// Requests made, for measurements (`requests()`).
    requests: AtomicU64,
    /// The lock this process holds on the prefix (maintain.rs), which its commits and
    /// deletions check first.
    lease: Mutex<Option<std::sync::Arc<maintain::Lease>>>,
}

impl S3Store {
    /// Connects to `s3://BUCKET[/PREFIX]` with the standard AWS configuration chain
    /// (environment including AWS_ENDPOINT_URL, profiles) and `settings`, and checks that
    /// the bucket is there and that we may use it.
    pub fn open(url: &str, settings: &S3Settings) -> anyhow::Result<S3Store> {
        let (bucket, prefix) = parse_url(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bkimg-s3")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("starting the S3 client runtime: {e}"))?;
        let sdk = rt.block_on(aws_config::defaults(BehaviorVersion::latest()).load());
        let env_endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|s| !s.is_empty());
        let custom = settings
            .endpoint
            .clone()
            .or(env_endpoint)
            .or_else(|| sdk.endpoint_url().map(str::to_owned))
            .or_else(|| settings.fallback_endpoint.clone());
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            // Our objects carry their own digests; the SDK's default CRC trailers and
            // response validation break on S3-compatible servers (Garage's
            // CompleteMultipartUpload, damaged objects reported as SDK errors).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(url) = &custom {
            // Custom endpoints (127.0.0.1, MinIO, Garage...) rarely resolve virtual-host
            // bucket names: address buckets by path.
            conf = conf.endpoint_url(url.clone()).force_path_style(true);
        }
        let region = sdk
            .region()
            .cloned()
            .or_else(|| settings.fallback_region.clone().map(Region::new))
            .unwrap_or_else(|| Region::new("us-east-1"));
        conf = conf.region(region.clone());
        let client = Client::from_conf(conf.build());
        let part_size = std::env::var("BKIMG_S3_PART_SIZE")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n >= 1024)
            .unwrap_or(PART_SIZE);
        let store = S3Store {
            rt,
            client,
            names: Names {
                url: display_url(&bucket, &prefix),
                bucket,
                endpoint: custom.unwrap_or_else(|| format!("AWS S3 ({region})")),
            },
            prefix,
            lock: None,
            part_size,
            chunks: Mutex::new(None),
            scratch_seq: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            lease: Mutex::new(None),
        };
        store
            .check_bucket()
            .map_err(|f| f.into_anyhow(&store.url()))?;
        Ok(store)
    }

    /// `s3://BUCKET/PREFIX`, for messages.
    pub fn url(&self) -> String {
        self.names.url.clone()
    }

    /// Requests sent so far (each retry counted once).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Puts a COMPLIANCE-mode retention of `days` on every object uploaded from now on,
    /// after checking that the bucket has Object Lock enabled.
    pub fn enable_object_lock(&mut self, days: u32) -> anyhow::Result<()> {
        if days == 0 {
            anyhow::bail!("--object-lock-days must be at least 1");
        }
        self.count();
        let got = self.rt.block_on(
            self.client
                .get_object_lock_configuration()
                .bucket(&self.names.bucket)
                .send(),
        );
        let enabled = match got {
            Ok(out) => {
                out.object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    == Some(&ObjectLockEnabled::Enabled)
            }
            Err(e) => match self.classify(e) {
                f @ (Failure::Denied(_) | Failure::Unreachable(_) | Failure::NoBucket(_)) => {
                    return Err(f.into_anyhow("bucket"))
                }
                _ => false,
            },
        };
        if !enabled {
            anyhow::bail!(
                "bucket {} does not have S3 Object Lock enabled (or {} does not support it): \
                 create the bucket with Object Lock (aws s3api create-bucket \
                 --object-lock-enabled-for-bucket ...), or leave out --object-lock-days",
                self.names.bucket,
                self.names.endpoint
            );
        }
        self.lock = Some(ObjectLock { days });
        Ok(())
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn key_config(&self) -> String {
        format!("{}{}", self.prefix, names::CONFIG)
    }

    pub(crate) fn key_chunk(&self, d: &Digest) -> String {
        format!("{}{}", self.prefix, names::chunk(d))
    }

    pub(crate) fn key_index(&self, d: &Digest) -> String {
        format!("{}{}", self.prefix, names::index(d))
    }

    pub(crate) fn key_point(&self, id: &str) -> String {
        format!("{}{}", self.prefix, names::manifest(id))
    }

    fn classify<E>(&self, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.names, e)
    }

    fn check_bucket(&self) -> Res<()> {
        self.count();
        match self
            .rt
            .block_on(self.client.head_bucket().bucket(&self.names.bucket).send())
        {
            Ok(_) => Ok(()),
            Err(e) => Err(match self.classify(e) {
                // HEAD has no body: a 404 on the bucket is a missing bucket.
                Failure::NotFound => Failure::NoBucket(format!(
                    "bucket {:?} does not exist at {}: create it first (e.g. aws s3 mb s3://{})",
                    self.names.bucket, self.names.endpoint, self.names.bucket
                )),
                other => other,
            }),
        }
    }

    /// The whole object at `key`, refusing more than `max` bytes.
    pub(crate) fn get(
        &self,
        key: &str,
        max: u64,
        what: &str,
    ) -> std::result::Result<Vec<u8>, GetError> {
        self.count();
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.names.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| GetError::Remote(self.classify(e)))?;
            let len = out.content_length().unwrap_or(0).max(0) as u64;
            if len > max {
                return Err(GetError::TooLarge(len));
            }
            let mut body = out.body;
            let mut buf = Vec::with_capacity(len as usize);
            while let Some(piece) = body.try_next().await.map_err(|e| {
                GetError::Remote(Failure::Unreachable(format!(
                    "reading {what} from {}: {e}",
                    self.names.endpoint
                )))
            })? {
                if (buf.len() + piece.len()) as u64 > max {
                    return Err(GetError::TooLarge(max + 1));
                }
                buf.extend_from_slice(&piece);
            }
            Ok(buf)
        })
    }

    /// Size of the object at `key`, None when it does not exist.
    pub(crate) fn size_of(&self, key: &str) -> Res<Option<u64>> {
        self.count();
        match self.rt.block_on(
            self.client
                .head_object()
                .bucket(&self.names.bucket)
                .key(key)
                .send(),
        ) {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match self.classify(e) {
                Failure::NotFound => Ok(None),
                other => Err(other),
            },
        }
    }

    fn retain_until(&self) -> Option<DateTime> {
        self.lock.map(|l| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            DateTime::from_secs((now + u64::from(l.days) * 86_400) as i64)
        })
    }

    /// One PUT of a whole object.
    pub(crate) fn put(&self, key: &str, bytes: Vec<u8>) -> Res<()> {
        self.put_object(key, bytes, self.retain_until())
    }

    /// One PUT without a retention, whatever the store's Object Lock setting (lock objects
    /// are rewritten and deleted).
    pub(crate) fn put_unretained(&self, key: &str, bytes: Vec<u8>) -> Res<()> {
        self.put_object(key, bytes, None)
    }

    fn put_object(&self, key: &str, bytes: Vec<u8>, retain_until: Option<DateTime>) -> Res<()> {
        self.count();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.names.bucket)
            .key(key)
            .body(ByteStream::from(bytes));
        let Some(until) = retain_until else {
            return self
                .rt
                .block_on(req.send())
                .map(|_| ())
                .map_err(|e| self.classify(e));
        };
        // S3 requires an integrity checksum on uploads with a retention.
        req = req
            .object_lock_mode(ObjectLockMode::Compliance)
            .object_lock_retain_until_date(until)
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        self.rt
            .block_on(req.customize().config_override(checksums_sent()).send())
            .map(|_| ())
            .map_err(|e| self.classify(e))
    }

    /// Uploads everything `input` yields to `key`: one PUT when it is smaller than a part,
    /// multipart otherwise (aborted on failure). `sent` is called with each part's size
    /// before it goes (bandwidth limit). Returns the bytes uploaded.
    pub(crate) fn put_stream(
        &self,
        key: &str,
        input: &mut dyn Read,
        size_hint: u64,
        sent: &dyn Fn(u64),
    ) -> Res<u64> {
        let part = (self.part_size as u64).max(size_hint.div_ceil(MAX_PARTS)) as usize;
        let first = read_up_to(input, part).map_err(|e| Failure::Other(e.to_string()))?;
        if first.len() < part {
            let n = first.len() as u64;
            sent(n);
            self.put(key, first)?;
            return Ok(n);
        }
        self.count();
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.names.bucket)
            .key(key);
        if let Some(until) = self.retain_until() {
            create = create
                .object_lock_mode(ObjectLockMode::Compliance)
                .object_lock_retain_until_date(until)
                .checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        let upload = self
            .rt
            .block_on(create.send())
            .map_err(|e| self.classify(e))?;
        let upload_id = upload
            .upload_id()
            .ok_or_else(|| Failure::Other("CreateMultipartUpload returned no upload id".into()))?
            .to_string();
        let result = (|| -> Res<u64> {
            let mut parts = Vec::new();
            let mut total = 0u64;
            let mut buf = first;
            let mut number = 1i32;
            while !buf.is_empty() {
                let n = buf.len() as u64;
                sent(n);
                self.count();
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.names.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(buf));
                let out = if self.lock.is_some() {
                    let req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
                    self.rt
                        .block_on(req.customize().config_override(checksums_sent()).send())
                } else {
                    self.rt.block_on(req.send())
                }
                .map_err(|e| self.classify(e))?;
                let mut done = CompletedPart::builder()
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .part_number(number);
                if self.lock.is_some() {
                    done = done.set_checksum_crc32(out.checksum_crc32().map(str::to_owned));
                }
                parts.push(done.build());
                total += n;
                number += 1;
                buf = read_up_to(input, part).map_err(|e| Failure::Other(e.to_string()))?;
            }
            self.count();
            let done = self.rt.block_on(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.names.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send(),
            );
            if let Err(e) = done {
                // Some servers (moto) answer 200 with a body the SDK cannot parse: the
                // upload is complete if the object is there with every byte.
                let answered = e.raw_response().map(|r| r.status().as_u16()) == Some(200);
                if !(answered && self.size_of(key)? == Some(total)) {
                    return Err(self.classify(e));
                }
            }
            Ok(total)
        })();
        if result.is_err() {
            // Best effort: a killed run leaves its parts behind (docs: lifecycle rule).
            let _ = self.rt.block_on(
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.names.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send(),
            );
        }
        result
    }

    /// Keys under `prefix` (relative to the store's prefix) with their sizes, all pages.
    pub(crate) fn list(&self, prefix: &str) -> Res<Vec<(String, u64)>> {
        let mut out = Vec::new();
        self.list_objects(prefix, &mut |page| {
            out.extend(page.iter().map(|o| (o.key.clone(), o.size)));
            true
        })?;
        Ok(out)
    }

    /// Keys under `prefix` with their last-modified times (Unix seconds).
    pub(crate) fn list_with_times(&self, prefix: &str) -> Res<Vec<(String, i64)>> {
        let mut out = Vec::new();
        self.list_objects(prefix, &mut |page| {
            out.extend(page.iter().map(|o| (o.key.clone(), o.modified)));
            true
        })?;
        Ok(out)
    }

    /// Objects under `prefix`, one page at a time; `each` returns false to stop early.
    pub(crate) fn list_objects(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(&[Listed]) -> bool,
    ) -> Res<()> {
        let full = format!("{}{prefix}", self.prefix);
        let mut token: Option<String> = None;
        loop {
            self.count();
            let page = self
                .rt
                .block_on(
                    self.client
                        .list_objects_v2()
                        .bucket(&self.names.bucket)
                        .prefix(&full)
                        .max_keys(LIST_PAGE)
                        .set_continuation_token(token.take())
                        .send(),
                )
                .map_err(|e| self.classify(e))?;
            let mut out = Vec::with_capacity(page.contents().len());
            for o in page.contents() {
                if let Some(k) = o.key().and_then(|k| k.strip_prefix(&full)) {
                    out.push(Listed {
                        key: k.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().map_or(0, |t| t.secs()),
                    });
                }
            }
            if !each(&out) {
                return Ok(());
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }

    /// Restore points in the bucket (valid ids under points/).
    pub fn point_ids(&self) -> Res<Vec<String>> {
        let mut ids: Vec<String> = self
            .list(&format!("{}/", names::POINTS))?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| valid_id(k))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Index ids in the bucket.
    pub fn index_ids(&self) -> Res<HashSet<Digest>> {
        Ok(self
            .list(&format!("{}/", names::INDEXES))?
            .into_iter()
            .filter_map(|(k, size)| {
                (size >= bkimg_format::index::HEADER_LEN as u64)
                    .then(|| Digest::from_hex(&k))
                    .flatten()
            })
            .collect())
    }

    /// Lists chunks/ once; later calls use the set.
    pub fn load_chunk_listing(&self) -> Res<()> {
        let mut set = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        if set.is_none() {
            let mut found = HashMap::new();
            for (k, size) in self.list(&format!("{}/", names::CHUNKS))? {
                // chunks/ab/<64 hex>; an object shorter than a header is not a chunk.
                let Some((fan, hex)) = k.split_once('/') else {
                    continue;
                };
                if size < chunk::HEADER_LEN as u64 || !hex.starts_with(fan) {
                    continue;
                }
                if let Some(d) = Digest::from_hex(hex) {
                    found.insert(d, size);
                }
            }
            *set = Some(found);
        }
        Ok(())
    }

    /// The size of chunk `d` in the bucket's listing, if it is listed.
    pub(crate) fn chunk_listed(&self, d: &Digest) -> Res<Option<u64>> {
        self.load_chunk_listing()?;
        let set = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        Ok(set.as_ref().and_then(|s| s.get(d).copied()))
    }

    pub(crate) fn put_chunk_blob(&self, d: &Digest, blob: Vec<u8>) -> Res<()> {
        let len = blob.len() as u64;
        self.put(&self.key_chunk(d), blob)?;
        let mut set = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = set.as_mut() {
            s.insert(*d, len);
        }
        Ok(())
    }

    /// The repository config, if the prefix holds a repository.
    pub fn read_config(&self) -> Res<Option<Vec<u8>>> {
        let max = sealed::MAX_BODY_LEN + 64;
        match self.get(&self.key_config(), max, "repository config") {
            Ok(b) => Ok(Some(b)),
            Err(GetError::Remote(Failure::NotFound)) => Ok(None),
            Err(GetError::Remote(f)) => Err(f),
            Err(GetError::TooLarge(n)) => Err(Failure::Other(format!(
                "the repository config is {n} bytes, more than any config can be"
            ))),
        }
    }

    /// Checks the config object: a repository is there and this bkimg can read it
    /// without a key.
    pub fn check_config(&self) -> anyhow::Result<()> {
        self.config(false).map(drop)
    }

    /// The repository's config; a protected one (encrypted or signed) is refused unless
    /// `protected` (the caller reads it through its key).
    pub fn config(&self, protected: bool) -> anyhow::Result<RepoConfig> {
        match self
            .read_config()
            .map_err(|f| f.into_anyhow("the repository config"))?
        {
            None => Err(FormatError::NotRepository(format!(
                "{} holds no bkimg repository (no config object): check the bucket and \
                 prefix, or replicate to it first (bkimg replicate --to {})",
                self.url(),
                self.url()
            ))
            .into()),
            Some(bytes) => Ok(parse_config(
                &bytes,
                &format!("repository {}", self.url()),
                &format!("repository config of {}", self.url()),
                protected,
            )?),
        }
    }

    /// The key slots stored beside a protected repository (spec/format.md §18.5), by id.
    pub fn key_slots(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let max = sealed::MAX_BODY_LEN + 64;
        let mut out = Vec::new();
        for (k, _) in self
            .list(&format!("{}/", names::KEYS))
            .map_err(|f| f.into_anyhow("the key slots"))?
        {
            if !bkimg_format::keys::valid_slot_id(&k) {
                continue;
            }
            let what = format!("key slot {k}");
            let bytes = self
                .get(&self.key_slot(&k), max, &what)
                .map_err(|e| get_error(e, what, max))?;
            out.push((k, bytes));
        }
        out.sort();
        Ok(out)
    }

    /// Uploads the key slots the bucket lacks or holds otherwise, and removes those the
    /// source no longer has (a removed passphrase must not stay usable on the copy).
    pub fn sync_key_slots(&self, slots: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let have = self.key_slots()?;
        for (id, bytes) in slots {
            if !have.iter().any(|(i, b)| i == id && b == bytes) {
                self.put(&self.key_slot(id), bytes.clone())
                    .map_err(|f| f.into_anyhow(&format!("key slot {id}")))?;
            }
        }
        for (id, _) in &have {
            if !slots.iter().any(|(i, _)| i == id) {
                self.delete_key(&self.key_slot(id))
                    .map_err(|f| f.into_anyhow(&format!("key slot {id}")))?;
            }
        }
        Ok(())
    }

    pub(crate) fn key_slot(&self, id: &str) -> String {
        format!("{}{}/{id}", self.prefix, names::KEYS)
    }

    /// Uploads `local` (the source repository's config) unless the bucket has one; a
    /// repository config is written once, like a local one.
    pub fn ensure_config(&self, local: &[u8]) -> anyhow::Result<()> {
        parse_config(
            local,
            "the local repository",
            "the local repository's config",
            true,
        )?;
        let have = self
            .read_config()
            .map_err(|f| f.into_anyhow("the repository config"))?;
        if have.is_none() {
            self.put(&self.key_config(), local.to_vec())
                .map_err(|f| f.into_anyhow("the repository config"))?;
        }
        Ok(())
    }

    fn scratch_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "bkimg-s3-{}-{}",
            std::process::id(),
            self.scratch_seq.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// What a store's messages name: bucket, location, endpoint.
#[derive(Clone, Debug)]
struct Names {
    bucket: String,
    /// `s3://BUCKET[/PREFIX]`
    url: String,
    endpoint: String,
}

/// The store computes request checksums only where an operation requires one (Garage and
/// other servers reject some it would add otherwise). Uploads with a retention need one
/// that S3 does not mark as required: with "when required" the SDK would send the
/// algorithm header without the checksum, which AWS refuses. These requests override it.
fn checksums_sent() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default()
        .request_checksum_calculation(RequestChecksumCalculation::WhenSupported)
}

fn display_url(bucket: &str, prefix: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

/// Maps an SDK error to what callers branch on; the message is one line.
fn classify<E>(names: &Names, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_owned);
    let detail = || {
        let mut s = format!("{}", DisplayErrorContext(&e));
        s = s.replace('\n', " ");
        s
    };
    if matches!(
        e,
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_)
    ) && detail().contains("credential")
    {
        return Failure::Denied(format!(
            "no usable AWS credentials for {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or AWS_PROFILE) ({})",
            names.url,
            short(&detail())
        ));
    }
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            return Failure::Unreachable(format!(
                "cannot reach the S3 endpoint {} ({})",
                names.endpoint,
                short(&detail())
            ))
        }
        SdkError::ConstructionFailure(_) => return Failure::Other(short(&detail())),
        _ => {}
    }
    match (code.as_deref(), status) {
        (Some("NoSuchBucket"), _) => Failure::NoBucket(format!(
            "bucket {:?} does not exist at {}: create it first (e.g. aws s3 mb s3://{})",
            names.bucket, names.endpoint, names.bucket
        )),
        (Some("NoSuchKey"), _) | (_, Some(404)) => Failure::NotFound,
        (
            Some(
                c @ ("InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "InvalidToken"
                | "ExpiredToken"
                | "AllAccessDisabled"),
            ),
            _,
        ) => Failure::Denied(format!(
            "{} refused access to {} ({c}): check the credentials (AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's permissions",
            names.endpoint, names.url
        )),
        (c, Some(401 | 403)) => Failure::Denied(format!(
            "{} refused access to {} ({}): check the credentials (AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's permissions",
            names.endpoint,
            names.url,
            c.unwrap_or("HTTP 403")
        )),
        (c, Some(501)) => Failure::Other(format!(
            "{} does not implement this request ({})",
            names.endpoint,
            c.unwrap_or("NotImplemented")
        )),
        (c, Some(s)) if s >= 500 => Failure::Unreachable(format!(
            "the S3 endpoint {} keeps failing ({}, HTTP {s})",
            names.endpoint,
            c.unwrap_or("server error")
        )),
        _ => Failure::Other(short(&detail())),
    }
}

/// A GET that failed, or returned more than the caller allows.
#[derive(Debug)]
pub(crate) enum GetError {
    Remote(Failure),
    TooLarge(u64),
}

fn short(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn read_up_to(input: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n.min(64 << 20));
    input.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Large indexes are read by ranged GETs of this many bytes, so a slow consumer never
/// holds a connection open and memory stays bounded.
const INDEX_READ: u64 = 8 << 20;

/// A large index, read range by range. Owns a client handle (the trait wants `'static`).
struct StreamingIndex {
    client: Client,
    rt: tokio::runtime::Handle,
    names: Names,
    key: String,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    at: usize,
}

impl StreamingIndex {
    fn fill(&mut self) -> io::Result<()> {
        let len = INDEX_READ.min(self.size - self.pos);
        let req = self
            .client
            .get_object()
            .bucket(&self.names.bucket)
            .key(&self.key)
            .range(format!("bytes={}-{}", self.pos, self.pos + len - 1));
        let names = &self.names;
        let got = self.rt.block_on(async {
            let out = req.send().await.map_err(|e| classify(names, e))?;
            out.body
                .collect()
                .await
                .map(|b| b.into_bytes().to_vec())
                .map_err(|e| Failure::Unreachable(format!("reading from {}: {e}", names.endpoint)))
        });
        self.buf = got.map_err(|f| match f {
            Failure::Unreachable(m) => io::Error::other(RemoteError::Unreachable(m)),
            Failure::Denied(m) => io::Error::other(RemoteError::Denied(m)),
            Failure::NotFound => io::Error::new(io::ErrorKind::NotFound, "the object vanished"),
            Failure::NoBucket(m) | Failure::Other(m) => io::Error::other(m),
        })?;
        self.pos += self.buf.len() as u64;
        self.at = 0;
        Ok(())
    }
}

impl Read for StreamingIndex {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.pos >= self.size {
                return Ok(0);
            }
            self.fill()?;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl StoreRead for S3Store {
    fn location(&self) -> String {
        self.url()
    }

    fn list_manifests(&self) -> bkimg_format::Result<Vec<String>> {
        self.point_ids()
            .map_err(|f| f.into_format(format!("the restore point list of {}", self.url())))
    }

    fn read_manifest(&self, id: &str) -> bkimg_format::Result<Vec<u8>> {
        let what = format!("restore point {id}");
        if !valid_id(id) {
            return Err(FormatError::missing(what));
        }
        let max = sealed::MAX_BODY_LEN + 64;
        self.get(&self.key_point(id), max, &what)
            .map_err(|e| get_error(e, what, max))
    }

    fn open_index(&self, id: &Digest) -> bkimg_format::Result<Box<dyn Read + Send>> {
        let what = format!("volume index {id}");
        let key = self.key_index(id);
        let size = self
            .size_of(&key)
            .map_err(|f| f.into_format(what.clone()))?
            .ok_or_else(|| FormatError::missing(what.clone()))?;
        if size <= INDEX_READ {
            // Small (most): one request.
            let bytes = self
                .get(&key, INDEX_READ, &what)
                .map_err(|e| get_error(e, what, INDEX_READ))?;
            return Ok(Box::new(io::Cursor::new(bytes)));
        }
        Ok(Box::new(StreamingIndex {
            client: self.client.clone(),
            rt: self.rt.handle().clone(),
            names: self.names.clone(),
            key,
            size,
            pos: 0,
            buf: Vec::new(),
            at: 0,
        }))
    }

    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> bkimg_format::Result<()> {
        let what = format!("chunk {digest}");
        // Sealed in an encrypted repository: the blob and the envelope around it.
        let max = chunk::HEADER_LEN as u64
            + u64::from(bkimg_format::MAX_CHUNK_SIZE)
            + bkimg_format::crypto::ENVELOPE_OVERHEAD as u64;
        *out = self
            .get(&self.key_chunk(digest), max, &what)
            .map_err(|e| get_error(e, what, max))?;
        Ok(())
    }

    fn has_chunk(&self, digest: &Digest) -> bkimg_format::Result<bool> {
        // A PUT is atomic: a listed key is a complete object.
        self.chunk_listed(digest)
            .map(|size| size.is_some())
            .map_err(|f| f.into_format(format!("the chunk list of {}", self.url())))
    }

    fn read_prune_record(&self, id: &str) -> bkimg_format::Result<Option<Vec<u8>>> {
        self.read_prune_record_object(id)
    }
}

fn get_error(e: GetError, what: String, max: u64) -> FormatError {
    match e {
        GetError::Remote(f) => f.into_format(what),
        GetError::TooLarge(n) => FormatError::corrupt(
            what,
            format!("object is {n} bytes, more than the {max} it may be"),
        ),
    }
}

impl StoreWrite for S3Store {
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> bkimg_format::Result<()> {
        self.put_chunk_blob(digest, blob.to_vec())
            .map_err(|f| f.into_format(format!("chunk {digest}")))
    }

    fn scratch_file(&self) -> bkimg_format::Result<(File, PathBuf)> {
        let path = self.scratch_path();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| FormatError::io(format!("creating {}", path.display()), e))?;
        Ok((file, path))
    }

    fn put_index(&self, id: &Digest, scratch: &Path) -> bkimg_format::Result<()> {
        let what = format!("volume index {id}");
        let result = (|| {
            let mut file = File::open(scratch)
                .map_err(|e| FormatError::io(format!("opening {}", scratch.display()), e))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.put_stream(&self.key_index(id), &mut file, size, &|_| {})
                .map_err(|f| f.into_format(what.clone()))
        })();
        let _ = std::fs::remove_file(scratch);
        result.map(|_| ())
    }

    fn commit_manifest(&self, id: &str, bytes: &[u8]) -> bkimg_format::Result<()> {
        assert!(valid_id(id), "restore point ids are generated valid");
        self.check_lease()?;
        let what = format!("restore point {id}");
        let key = self.key_point(id);
        // Every object it names was acknowledged by the server before this point (a PUT
        // answered 200 is durable). Refusing to replace is checked, not left to
        // If-None-Match, which some servers ignore; ids carry a random part besides.
        if self
            .size_of(&key)
            .map_err(|f| f.into_format(what.clone()))?
            .is_some()
        {
            return Err(FormatError::io(
                format!("committing {what}"),
                io::Error::new(io::ErrorKind::AlreadyExists, "it already exists"),
            ));
        }
        self.put(&key, bytes.to_vec())
            .map_err(|f| f.into_format(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://backups").unwrap(),
            ("backups".into(), String::new())
        );
        assert_eq!(
            parse_url("s3://backups/site/host1/").unwrap(),
            ("backups".into(), "site/host1/".into())
        );
        assert_eq!(
            parse_url("s3://backups//x").unwrap(),
            ("backups".into(), "x/".into())
        );
        for bad in [
            "backups",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://b_c d",
            "s3://bkt/a/../b",
            "s3://bkt/./b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(display_url("b", ""), "s3://b");
        assert_eq!(display_url("b", "p/q/"), "s3://b/p/q");
    }

    #[test]
    fn failures_map_to_exit_classes() {
        let e = Failure::Denied("no".into()).into_anyhow("x");
        assert!(matches!(
            e.downcast_ref::<RemoteError>(),
            Some(RemoteError::Denied(_))
        ));
        let e = Failure::Unreachable("down".into()).into_anyhow("x");
        assert!(matches!(
            e.downcast_ref::<RemoteError>(),
            Some(RemoteError::Unreachable(_))
        ));
        let e = Failure::NoBucket("none".into()).into_anyhow("x");
        assert!(matches!(
            e.downcast_ref::<FormatError>(),
            Some(FormatError::NotRepository(_))
        ));
        assert!(matches!(
            Failure::NotFound.into_format("chunk 00"),
            FormatError::Missing { .. }
        ));
    }

    #[test]
    fn read_up_to_splits_parts() {
        let data = vec![7u8; 10];
        let mut r: &[u8] = &data;
        assert_eq!(read_up_to(&mut r, 4).unwrap().len(), 4);
        assert_eq!(read_up_to(&mut r, 4).unwrap().len(), 4);
        assert_eq!(read_up_to(&mut r, 4).unwrap().len(), 2);
        assert!(read_up_to(&mut r, 4).unwrap().is_empty());
    }
}
