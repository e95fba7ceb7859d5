//! A repository in a local directory.
//!
//! ```text
//! DIR/config                   sealed JSON: repository id and format version
//! DIR/chunks/ab/abcd...(64)    chunk blobs, fanned out by the first byte of the digest
//! DIR/indexes/<64 hex>         volume indexes
//! DIR/points/<id>              manifests: one per restore point, written last
//! DIR/pruned/<id>              records of pruned parents of remaining restore points
//! DIR/lock                     advisory lock: shared by every user, exclusive for prune
//!                              and key changes
//! DIR/keys/<16 hex>            key slots of an encrypted repository
//! DIR/tmp/<pid>-<n>/           scratch space of running writers
//! ```
//! Chunks and indexes are written to scratch files and renamed into place, so a name in
//! chunks/ or indexes/ never holds a partly written object; the manifest is written only
//! after a syncfs, so every object it names is durable before it is visible.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use serde::{Deserialize, Serialize};

use super::{StoreMaintain, StoreRead, StoreWrite};
use crate::chunk::{self, ChunkHeader};
use crate::crypto::ObjectKind;
use crate::digest::Digest;
use crate::error::{FormatError, IoContext, Result};
use crate::keys::Encryption;
use crate::magic;
use crate::manifest::valid_id;
use crate::sealed::{self, Features, Kind};
use crate::store::names;

pub const CONFIG_KIND: Kind = Kind {
    name: "repository config",
    magic: magic::REPO_CONFIG,
    version: 1,
    known_incompat: 0,
};

/// Incompat feature bit of the config: the repository is encrypted or signed and its
/// config has an `encryption` member (spec/format.md §8, §18).
pub const FEATURE_ENCRYPTION: u32 = 0x1;

/// The config as the key commands read it: they know the encryption bit, which the
/// commands that read restore points do not know yet.
pub const CONFIG_KIND_KEYS: Kind = Kind {
    known_incompat: FEATURE_ENCRYPTION,
    ..CONFIG_KIND
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoConfig {
    pub repository_id: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

impl RepoConfig {
    /// The header features this config needs.
    pub fn features(&self) -> Features {
        Features {
            incompat: if self.encryption.is_some() {
                FEATURE_ENCRYPTION
            } else {
                0
            },
            compat: 0,
        }
    }
}

/// Reads a repository's config, refusing an encrypted one unless `keys` (the key commands)
/// with a message that says what this bkimg can and cannot do with it.
fn read_config(root: &Path, keys: bool) -> Result<RepoConfig> {
    let config = root.join(names::CONFIG);
    let bytes = read_bounded(&config, crate::sealed::MAX_BODY_LEN + 64, || {
        format!("repository config {}", config.display())
    })
    .map_err(|e| match e {
        FormatError::Missing { .. } => FormatError::NotRepository(format!(
            "{} is not a bkimg repository (it has no config file)",
            root.display()
        )),
        other => other,
    })?;
    parse_config(
        &bytes,
        &format!("repository {}", root.display()),
        &format!("repository config {}", config.display()),
        keys,
    )
}

/// Decodes a repository config (`what` names the repository, `config_what` its config, in
/// messages). A protected one (encrypted or signed) is refused as unsupported unless
/// `protected`: the caller must then read the repository through its key.
pub fn parse_config(
    bytes: &[u8],
    what: &str,
    config_what: &str,
    protected: bool,
) -> Result<RepoConfig> {
    let (value, features): (RepoConfig, Features) = sealed::open(&CONFIG_KIND_KEYS, bytes)
        .map_err(|e| match e {
            FormatError::Corrupt { detail, .. } => FormatError::corrupt(config_what, detail),
            other => other,
        })?;
    if features.incompat & FEATURE_ENCRYPTION != 0 && !protected {
        return Err(FormatError::unavailable(
            what,
            "encryption (config feature bit 0x1): this command cannot read an encrypted or \
             signed repository yet (capture, list, info, verify, restore, export, prune and \
             replication to S3 and the standby can, with its key)",
        ));
    }
    if (features.incompat & FEATURE_ENCRYPTION != 0) != value.encryption.is_some() {
        return Err(FormatError::corrupt(
            config_what,
            "the encryption feature bit and the encryption member disagree",
        ));
    }
    if value
        .encryption
        .as_ref()
        .is_some_and(|e| e.mode == crate::keys::Mode::None)
    {
        return Err(FormatError::corrupt(
            config_what,
            "encryption mode \"none\" is written as no encryption member",
        ));
    }
    Ok(value)
}

fn seals_chunks(config: &RepoConfig) -> bool {
    config
        .encryption
        .as_ref()
        .is_some_and(|e| e.mode == crate::keys::Mode::Encrypted)
}

pub struct LocalDir {
    root: PathBuf,
    /// Chunks are stored in envelopes (an encrypted repository, spec/format.md §18.4).
    sealed_chunks: bool,
    /// This process's scratch directory, made on first use.
    scratch: OnceLock<PathBuf>,
    scratch_seq: AtomicU64,
    /// Held while this value lives; `None` on read-only media without a lock file.
    _lock: Option<Flock<File>>,
}

/// How long opening a repository waits for a running prune to finish.
const SHARED_LOCK_WAIT: Duration = Duration::from_secs(600);

impl LocalDir {
    /// Whether `path` looks like a local repository.
    pub fn is_repository(path: &Path) -> bool {
        path.join(names::CONFIG).is_file() && path.join(names::POINTS).is_dir()
    }

    /// Opens an existing repository, sharing it with other readers and writers (waits
    /// for a running prune to finish).
    ///
    /// An encrypted or signed repository is refused: its objects must be read through
    /// [`Protected`](super::Protected), so callers that can unlock it use
    /// [`open_any`](Self::open_any).
    pub fn open(root: &Path) -> Result<LocalDir> {
        Ok(Self::open_locked(root, Lock::Shared, false)?.0)
    }

    /// Opens an existing repository, protected or not, and returns its config, which
    /// says how to unlock it (spec/format.md §18.6).
    pub fn open_any(root: &Path) -> Result<(LocalDir, RepoConfig)> {
        Self::open_locked(root, Lock::Shared, true)
    }

    /// Opens an existing repository for pruning: no other process may use it meanwhile.
    /// Without `wait`, a repository in use is refused at once ([`FormatError::Busy`]).
    pub fn open_exclusive(root: &Path, wait: bool) -> Result<LocalDir> {
        Ok(Self::open_locked(root, Lock::Exclusive { wait }, false)?.0)
    }

    /// [`open_exclusive`](Self::open_exclusive) for a repository protected or not.
    pub fn open_exclusive_any(root: &Path, wait: bool) -> Result<(LocalDir, RepoConfig)> {
        Self::open_locked(root, Lock::Exclusive { wait }, true)
    }

    fn open_locked(root: &Path, lock: Lock, protected: bool) -> Result<(LocalDir, RepoConfig)> {
        read_config(root, protected)?;
        let lock = take_lock(root, lock)?;
        // `bkimg key init` may have encrypted it while we waited for the lock.
        let config = read_config(root, protected)?;
        Ok((
            LocalDir {
                root: root.to_path_buf(),
                sealed_chunks: seals_chunks(&config),
                scratch: OnceLock::new(),
                scratch_seq: AtomicU64::new(0),
                _lock: lock,
            },
            config,
        ))
    }

    /// Opens the repository at `root`, creating it if the directory is missing or empty.
    ///
    /// Every step of the creation can be repeated: a creation that was killed half-way
    /// (directories made, no config yet) is finished by the next one, and two creating at
    /// once end up with the same repository (the config is linked into place, never
    /// replaced).
    pub fn open_or_create(root: &Path, repository_id: &str, created: &str) -> Result<LocalDir> {
        Self::create(root, repository_id, created)?;
        Self::open(root)
    }

    /// [`open_or_create`](Self::open_or_create) for a repository protected or not.
    pub fn open_or_create_any(
        root: &Path,
        repository_id: &str,
        created: &str,
    ) -> Result<(LocalDir, RepoConfig)> {
        Self::create(root, repository_id, created)?;
        Self::open_any(root)
    }

    fn create(root: &Path, repository_id: &str, created: &str) -> Result<()> {
        if Self::is_repository(root) {
            return Ok(());
        }
        if root.exists() && !root.is_dir() {
            return Err(FormatError::NotRepository(format!(
                "{} is a file, not a bkimg repository: name a new or empty directory",
                root.display()
            )));
        }
        if root.exists() && !unfinished_or_empty(root)? {
            return Err(FormatError::NotRepository(format!(
                "{} is neither empty nor a bkimg repository: name an empty or new directory",
                root.display()
            )));
        }
        for sub in [names::CHUNKS, names::INDEXES, names::POINTS, "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        for byte in 0..=255u8 {
            let dir = root.join(names::CHUNKS).join(hex::encode([byte]));
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let config = RepoConfig {
            repository_id: repository_id.to_string(),
            created: created.to_string(),
            encryption: None,
        };
        let bytes = sealed::seal(&CONFIG_KIND, Features::default(), &config);
        let dest = root.join(names::CONFIG);
        let tmp = root.join("tmp").join(format!(
            ".config.{}-{}",
            std::process::id(),
            Digest::of_bytes(repository_id.as_bytes())
                .to_hex()
                .get(..8)
                .unwrap_or("0")
        ));
        let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .ctx(|| format!("writing {}", tmp.display()))?;
        drop(f);
        // link(2) fails if another creation got there first: its config stands.
        match fs::hard_link(&tmp, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(FormatError::io(format!("creating {}", dest.display()), e));
            }
        }
        let _ = fs::remove_file(&tmp);
        File::open(root)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing {}", root.display()))
    }

    /// Opens a repository, encrypted or not, for changing its keys: no other process may
    /// use it meanwhile ([`FormatError::Busy`] at once otherwise).
    pub fn open_for_keys(root: &Path) -> Result<(LocalDir, RepoConfig)> {
        Self::open_exclusive_any(root, false)
    }

    /// Whether any restore point (or prune record) exists.
    pub fn has_points(&self) -> Result<bool> {
        for sub in [names::POINTS, names::PRUNED] {
            let dir = self.root.join(sub);
            match fs::read_dir(&dir) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(FormatError::io(format!("listing {}", dir.display()), e)),
            }
        }
        Ok(false)
    }

    /// Replaces the config (temp file, fsync, rename, fsync). Only under the exclusive
    /// lock of [`open_for_keys`](Self::open_for_keys).
    pub fn replace_config(&self, config: &RepoConfig) -> Result<()> {
        let bytes = sealed::seal(&CONFIG_KIND, config.features(), config);
        write_durably(&self.root.join(names::CONFIG), &bytes, self.scratch_dir()?)
    }

    /// The key slots stored in the repository: id and bytes, by id.
    pub fn key_slots(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let dir = self.root.join(names::KEYS);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FormatError::io(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !crate::keys::valid_slot_id(&id) {
                continue;
            }
            let path = entry.path();
            let bytes = read_bounded(&path, crate::sealed::MAX_BODY_LEN + 64, || {
                format!("key slot {id}")
            })?;
            out.push((id, bytes));
        }
        out.sort();
        Ok(out)
    }

    pub fn put_key_slot(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.root.join(names::KEYS);
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        write_durably(&dir.join(id), bytes, self.scratch_dir()?)
    }

    pub fn delete_key_slot(&self, id: &str) -> Result<()> {
        remove_durably(&self.root.join(names::KEYS).join(id))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.root.join(names::chunk(d))
    }

    pub fn index_path(&self, d: &Digest) -> PathBuf {
        self.root.join(names::index(d))
    }

    pub fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join(names::manifest(id))
    }

    pub fn prune_record_path(&self, id: &str) -> PathBuf {
        self.root.join(names::prune_record(id))
    }

    fn scratch_dir(&self) -> Result<&PathBuf> {
        if let Some(dir) = self.scratch.get() {
            return Ok(dir);
        }
        remove_stale_scratch(&self.root.join("tmp"));
        let dir = self.root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            Digest::of_bytes(format!("{:?}", std::time::SystemTime::now()).as_bytes())
                .to_hex()
                .get(..8)
                .unwrap_or("0")
        ));
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(self.scratch.get_or_init(|| dir))
    }

    fn next_scratch_path(&self) -> Result<PathBuf> {
        let n = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        Ok(self.scratch_dir()?.join(n.to_string()))
    }
}

impl Drop for LocalDir {
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.get() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[derive(Clone, Copy)]
enum Lock {
    Shared,
    Exclusive { wait: bool },
}

/// Takes the repository's advisory lock (flock: released by the kernel when the process
/// dies, so a killed prune never leaves the repository locked).
fn take_lock(root: &Path, lock: Lock) -> Result<Option<Flock<File>>> {
    let path = root.join(names::LOCK);
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => match (lock, File::open(&path)) {
            (_, Ok(f)) => f,
            // Read-only media without a lock file: nobody can prune there.
            (Lock::Shared, Err(_)) => return Ok(None),
            (Lock::Exclusive { .. }, Err(_)) => {
                return Err(FormatError::io(format!("opening {}", path.display()), e))
            }
        },
    };
    match lock {
        Lock::Exclusive { wait: false } => match Flock::lock(file, FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => Ok(Some(l)),
            Err((_, Errno::EWOULDBLOCK)) => Err(FormatError::Busy(format!(
                "{} is in use (a capture, restore, replication or standby session is open on \
                 it): run prune again when it has finished, or add --wait",
                root.display()
            ))),
            Err((_, e)) => Err(FormatError::io(
                format!("locking {}", path.display()),
                e.into(),
            )),
        },
        Lock::Exclusive { wait: true } => Flock::lock(file, FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, e)| FormatError::io(format!("locking {}", path.display()), e.into())),
        Lock::Shared => {
            let deadline = Instant::now() + SHARED_LOCK_WAIT;
            let mut file = file;
            loop {
                match Flock::lock(file, FlockArg::LockSharedNonblock) {
                    Ok(l) => return Ok(Some(l)),
                    Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                        file = f;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err((_, Errno::EWOULDBLOCK)) => {
                        return Err(FormatError::Busy(format!(
                            "{} is being pruned and the prune did not finish within {} s: run \
                             the command again when it has",
                            root.display(),
                            SHARED_LOCK_WAIT.as_secs()
                        )))
                    }
                    Err((_, e)) => {
                        return Err(FormatError::io(
                            format!("locking {}", path.display()),
                            e.into(),
                        ))
                    }
                }
            }
        }
    }
}

/// Removes scratch directories of writers that are no longer running (killed captures).
fn remove_stale_scratch(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_string_lossy().split('-').next().map(str::to_owned);
        let alive = pid.is_some_and(|p| Path::new("/proc").join(p).exists());
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl StoreRead for LocalDir {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list_manifests(&self) -> Result<Vec<String>> {
        let dir = self.root.join(names::POINTS);
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                if valid_id(name) {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn read_manifest(&self, id: &str) -> Result<Vec<u8>> {
        if !valid_id(id) {
            return Err(FormatError::missing(format!("restore point {id:?}")));
        }
        read_bounded(
            &self.manifest_path(id),
            crate::sealed::MAX_BODY_LEN + 64,
            || format!("restore point {id}"),
        )
    }

    fn open_index(&self, id: &Digest) -> Result<Box<dyn Read + Send>> {
        let path = self.index_path(id);
        let file = open_existing(&path, || format!("volume index {id}"))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }

    fn read_chunk(&self, digest: &Digest, out: &mut Vec<u8>) -> Result<()> {
        let path = self.chunk_path(digest);
        let mut file = open_existing(&path, || format!("chunk {digest}"))?;
        let len = file
            .metadata()
            .ctx(|| format!("reading {}", path.display()))?
            .len();
        let max = chunk::HEADER_LEN as u64
            + u64::from(crate::MAX_CHUNK_SIZE)
            + if self.sealed_chunks {
                crate::crypto::ENVELOPE_OVERHEAD as u64
            } else {
                0
            };
        if len > max {
            return Err(FormatError::corrupt(
                format!("chunk {digest}"),
                format!("file is {len} bytes, more than any chunk can be"),
            ));
        }
        out.clear();
        out.reserve(len as usize);
        file.read_to_end(out)
            .ctx(|| format!("reading {}", path.display()))?;
        Ok(())
    }

    fn stored_chunk_len(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.chunk_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FormatError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        // A name in chunks/ was renamed into place complete, but after a power loss before
        // the syncfs its content may be lost: check the header against the length.
        let path = self.chunk_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(FormatError::io(format!("opening {}", path.display()), e)),
        };
        let mut head = [0u8; chunk::HEADER_LEN];
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(false);
        }
        if self.sealed_chunks {
            // The blob's length is known only once opened: a complete envelope is at least
            // its overhead and a blob header long and starts as a chunk's envelope.
            return Ok(crate::crypto::is_envelope_of(&head, ObjectKind::Chunk)
                && len >= (crate::crypto::ENVELOPE_OVERHEAD + chunk::HEADER_LEN) as u64);
        }
        Ok(ChunkHeader::parse(&head).is_ok_and(|h| h.digest == *digest && h.blob_len() == len))
    }

    fn read_prune_record(&self, id: &str) -> Result<Option<Vec<u8>>> {
        if !valid_id(id) {
            return Ok(None);
        }
        match read_bounded(
            &self.prune_record_path(id),
            crate::sealed::MAX_BODY_LEN + 64,
            || format!("prune record of {id}"),
        ) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(FormatError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl StoreWrite for LocalDir {
    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<()> {
        let tmp = self.next_scratch_path()?;
        fs::write(&tmp, blob).ctx(|| format!("writing chunk {digest} to {}", tmp.display()))?;
        let dest = self.chunk_path(digest);
        // Renaming over a concurrent writer's copy is harmless: same digest, same bytes.
        fs::rename(&tmp, &dest).ctx(|| format!("storing chunk at {}", dest.display()))
    }

    fn scratch_file(&self) -> Result<(File, PathBuf)> {
        let path = self.next_scratch_path()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        Ok((file, path))
    }

    fn put_index(&self, id: &Digest, scratch: &Path) -> Result<()> {
        let dest = self.index_path(id);
        fs::rename(scratch, &dest).ctx(|| format!("storing index at {}", dest.display()))
    }

    fn commit_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        assert!(valid_id(id), "restore point ids are generated valid");
        let dest = self.manifest_path(id);
        if dest.exists() {
            return Err(FormatError::io(
                format!("committing restore point {id}"),
                io::Error::new(io::ErrorKind::AlreadyExists, "it already exists"),
            ));
        }
        // Every chunk and index named by the manifest must be on disk before it is.
        let root = File::open(&self.root).ctx(|| format!("opening {}", self.root.display()))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root))
            .map_err(|e| FormatError::io(format!("syncing {}", self.root.display()), e.into()))?;
        write_durably(&dest, bytes, self.scratch_dir()?)
    }
}

/// Temp file in `scratch`, fsync, rename to `dest`, fsync the directory.
/// Whether `root` holds nothing, or only what an unfinished repository creation leaves
/// before its config: the empty fan-out directories, the lock, scratch files (and a
/// filesystem's lost+found).
fn unfinished_or_empty(root: &Path) -> Result<bool> {
    let list = |dir: &Path| -> Result<Vec<String>> {
        fs::read_dir(dir)
            .ctx(|| format!("reading {}", dir.display()))?
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .ctx(|| format!("reading {}", dir.display()))
            })
            .collect()
    };
    for name in list(root)? {
        let path = root.join(&name);
        let fine = match name.as_str() {
            "lost+found" | names::LOCK | "tmp" => true,
            names::INDEXES | names::POINTS => path.is_dir() && list(&path)?.is_empty(),
            names::CHUNKS => {
                path.is_dir()
                    && list(&path)?.iter().all(|fan| {
                        fan.len() == 2
                            && fan.bytes().all(|b| b.is_ascii_hexdigit())
                            && list(&path.join(fan)).is_ok_and(|c| c.is_empty())
                    })
            }
            _ => false,
        };
        if !fine {
            return Ok(false);
        }
    }
    Ok(true)
}

fn write_durably(dest: &Path, bytes: &[u8], scratch: &Path) -> Result<()> {
    let tmp = scratch.join(format!(
        ".{}.tmp",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object")
    ));
    let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, dest).ctx(|| format!("renaming into {}", dest.display()))?;
    if let Some(dir) = dest.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

fn open_existing(path: &Path, what: impl FnOnce() -> String) -> Result<File> {
    File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            FormatError::missing(what())
        } else {
            FormatError::io(format!("opening {}", path.display()), e)
        }
    })
}

fn read_bounded(path: &Path, max: u64, what: impl Fn() -> String) -> Result<Vec<u8>> {
    let file = open_existing(path, &what)?;
    let mut out = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut out)
        .ctx(|| format!("reading {}", path.display()))?;
    if out.len() as u64 > max {
        return Err(FormatError::corrupt(
            what(),
            format!("larger than {max} bytes"),
        ));
    }
    Ok(out)
}

impl StoreMaintain for LocalDir {
    fn list_indexes(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join(names::INDEXES);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            if let Some(d) = entry.file_name().to_str().and_then(Digest::from_hex) {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn scan_chunks(&self, each: &mut super::ChunkBatchFn<'_>) -> Result<()> {
        let mut batch = Vec::new();
        for byte in 0..=255u8 {
            let dir = self.root.join(names::CHUNKS).join(hex::encode([byte]));
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(FormatError::io(format!("listing {}", dir.display()), e)),
            };
            batch.clear();
            for entry in entries {
                let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
                let Some(d) = entry.file_name().to_str().and_then(Digest::from_hex) else {
                    continue;
                };
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                batch.push((d, len));
            }
            each(&batch)?;
        }
        Ok(())
    }

    fn list_prune_records(&self) -> Result<Vec<String>> {
        let dir = self.root.join(names::PRUNED);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FormatError::io(format!("listing {}", dir.display()), e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            if let Some(name) = entry.file_name().to_str().filter(|n| valid_id(n)) {
                ids.push(name.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn put_prune_record(&self, id: &str, bytes: &[u8]) -> Result<()> {
        assert!(valid_id(id), "prune records are named by valid ids");
        let dir = self.root.join(names::PRUNED);
        if !dir.is_dir() {
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            sync_dir(&self.root)?;
        }
        write_durably(&self.prune_record_path(id), bytes, self.scratch_dir()?)
    }

    fn delete_manifest(&self, id: &str) -> Result<()> {
        remove_durably(&self.manifest_path(id))
    }

    fn delete_index(&self, id: &Digest) -> Result<()> {
        remove(&self.index_path(id))
    }

    fn delete_chunks(&self, digests: &[Digest]) -> Result<()> {
        for d in digests {
            remove(&self.chunk_path(d))?;
        }
        Ok(())
    }

    fn delete_prune_record(&self, id: &str) -> Result<()> {
        remove(&self.prune_record_path(id))
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FormatError::io(format!("removing {}", path.display()), e)),
    }
}

/// Removes a file and syncs its directory: a manifest deleted by prune must stay deleted
/// after a crash, because the data only it used is deleted next.
fn remove_durably(path: &Path) -> Result<()> {
    remove(path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Key, RepoKeys};
    use crate::keys::Mode;

    /// Rewrites the config of repository "r" as `key init` would, or with the bit left out.
    fn encrypt(root: &Path, mode: Mode, bit: bool) {
        let keys = RepoKeys::derive(&Key::random(), "r");
        let config = RepoConfig {
            repository_id: "r".into(),
            created: "2026-01-01T00:00:00Z".into(),
            encryption: Some(Encryption::new(mode, &keys, "r")),
        };
        let mut features = config.features();
        if !bit {
            features.incompat = 0;
        }
        let bytes = sealed::seal(&CONFIG_KIND, features, &config);
        write_durably(&root.join(names::CONFIG), &bytes, &root.join("tmp")).unwrap();
    }

    #[test]
    fn an_encrypted_repository_opens_only_for_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        drop(LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap());
        encrypt(&root, Mode::Encrypted, true);
        let e = LocalDir::open(&root).err().expect("refused");
        assert!(matches!(e, FormatError::Unavailable { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("cannot read an encrypted or signed repository yet"),
            "{e}"
        );
        assert!(LocalDir::open_or_create(&root, "x", "y").is_err());
        let (store, config) = LocalDir::open_for_keys(&root).unwrap();
        assert_eq!(config.encryption.unwrap().mode, Mode::Encrypted);
        // The key commands hold the repository alone.
        drop(store);
    }

    #[test]
    fn a_config_whose_bit_and_member_disagree_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        drop(LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap());
        encrypt(&root, Mode::Encrypted, false);
        assert!(matches!(
            LocalDir::open(&root),
            Err(FormatError::Corrupt { .. })
        ));
        encrypt(&root, Mode::None, true);
        assert!(matches!(
            LocalDir::open_for_keys(&root),
            Err(FormatError::Corrupt { .. })
        ));
    }

    #[test]
    fn slots_are_stored_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        drop(LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap());
        let (store, _) = LocalDir::open_for_keys(&root).unwrap();
        assert!(store.key_slots().unwrap().is_empty());
        store.put_key_slot("00000000000000aa", b"one").unwrap();
        store.put_key_slot("00000000000000bb", b"two").unwrap();
        fs::write(root.join(names::KEYS).join("not-a-slot"), b"x").unwrap();
        let ids: Vec<String> = store
            .key_slots()
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(ids, ["00000000000000aa", "00000000000000bb"]);
        store.delete_key_slot("00000000000000aa").unwrap();
        assert_eq!(store.key_slots().unwrap().len(), 1);
        assert!(!store.has_points().unwrap());
    }
}
