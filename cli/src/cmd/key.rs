//! `bkimg key`: make a repository encrypted and manage the key slots that unlock its
//! master key (spec/format.md §18); and the unlocking every command that reads or writes a
//! protected local repository goes through ([`protection`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bkimg_format::crypto::{Key, RepoKeys};
use bkimg_format::keys::{self, Argon2Params, Encryption, Mode, Secret, Slot};
use bkimg_format::protect::Protection;
use bkimg_format::repo::Repository;
use bkimg_format::store::{LocalDir, Protected, StoreRead};
use bkimg_format::FormatError;
use clap::{Args, Subcommand, ValueEnum};
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::config::{Config, RepoArgs};
use crate::exit::{self, Refused, Usage};
use crate::{out, out_json, Common};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Make a new or empty repository encrypted: a random master key, wrapped by a
    /// passphrase slot (and a key file slot with --key-file-out).
    Init(InitArgs),
    /// Add a key slot (a passphrase, or a new key file with --key-file-out).
    Add(AddArgs),
    /// Remove a key slot (never the last one).
    Remove(RemoveArgs),
    /// Change the passphrase of a passphrase slot.
    Passwd(PasswdArgs),
    /// List the key slots: kind, id, created, KDF parameters.
    List(ListArgs),
}

/// How to unlock the repository's key.
#[derive(Args, Default)]
pub struct Unlock {
    /// Read the passphrase from FILE (its first line) instead of asking on the terminal.
    #[arg(long, env = "BKIMG_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Unlock with a key file instead of a passphrase.
    #[arg(
        long,
        env = "BKIMG_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "password_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Accept a protected repository whose newest restore point is older than one this
    /// client has seen (restore points removed), or that is no longer protected, and
    /// remember it as it is now.
    #[arg(long)]
    pub accept_rollback: bool,
    /// Read a signed repository without its key: restore points are read but not
    /// authenticated (anyone who could write to the repository could have forged them).
    /// Read commands only; an encrypted repository always needs its key.
    #[arg(long, conflicts_with_all = ["password_file", "key_file", "accept_rollback"])]
    pub unauthenticated: bool,
}

impl Unlock {
    fn given(&self) -> Option<String> {
        match (&self.key_file, &self.password_file) {
            (Some(k), _) => Some(format!("key file {}", k.display())),
            (None, Some(p)) => Some(format!("password file {}", p.display())),
            (None, None) => None,
        }
    }

    /// Refuses to create a repository when a key was given: it would be unprotected.
    pub fn refuse_new_repository(&self, root: &Path) -> Result<()> {
        match self.given() {
            Some(key) if !LocalDir::is_repository(root) => Err(Refused(format!(
                "{} is not a repository yet and a key was given ({key}): make it encrypted \
                 first with `bkimg key init --repo {}`, or capture without the key for an \
                 unprotected one",
                root.display(),
                root.display()
            ))
            .into()),
            _ => Ok(()),
        }
    }

    /// Refuses `--unauthenticated` for a command that writes: what it writes must be signed.
    pub fn refuse_unauthenticated(&self, command: &str) -> Result<()> {
        if self.unauthenticated {
            return Err(Usage(format!(
                "--unauthenticated is for reading a signed repository without its key; \
                 {command} writes, and what it writes must be signed: give the key \
                 (--key-file or --password-file)"
            ))
            .into());
        }
        Ok(())
    }

    /// Refuses a key given for a repository that is neither encrypted nor signed: if it
    /// should be protected, it may have been replaced by one holding someone else's
    /// restore points.
    pub fn refuse_for_unprotected(&self, location: &str) -> Result<()> {
        match self.given() {
            Some(key) => Err(FormatError::Denied(format!(
                "{location} is neither encrypted nor signed, but a key was given ({key}, or \
                 BKIMG_KEY_FILE / BKIMG_PASSWORD_FILE): if it should be protected it may have \
                 been replaced; otherwise unset the key to read it as it is"
            ))
            .into()),
            None => Ok(()),
        }
    }

    /// Refuses a key given for a repository that cannot use one (yet).
    pub fn refuse_for(&self, what: &str) -> Result<()> {
        match self.given() {
            Some(key) => Err(Refused(format!(
                "a key was given ({key}, or BKIMG_KEY_FILE / BKIMG_PASSWORD_FILE) for {what}, \
                 which bkimg reads only unprotected so far: unset it to read the repository \
                 as it is"
            ))
            .into()),
            None => Ok(()),
        }
    }
}

/// How a local repository's objects are protected, its keys unlocked with `how` when it is
/// encrypted or signed (the passphrase is asked for only then).
///
/// A key given for a repository that is neither is refused: a repository that should be
/// protected may have been replaced by an unprotected one carrying someone else's restore
/// points.
pub fn protection(
    store: &LocalDir,
    config: &bkimg_format::store::local::RepoConfig,
    how: &Unlock,
) -> Result<Arc<Protection>> {
    protection_with(
        &store.root().display().to_string(),
        config,
        || Ok(store.key_slots()?),
        how,
    )
}

/// [`protection`] for a repository anywhere: `slots` gives its stored key slots, read
/// only when it is protected.
pub fn protection_with(
    location: &str,
    config: &bkimg_format::store::local::RepoConfig,
    slots: impl FnOnce() -> Result<Vec<(String, Vec<u8>)>>,
    how: &Unlock,
) -> Result<Arc<Protection>> {
    let Some(enc) = &config.encryption else {
        how.refuse_for_unprotected(location)?;
        return Ok(Arc::new(Protection::none()));
    };
    if how.unauthenticated {
        let protection = Protection::unauthenticated(enc)?;
        eprintln!(
            "warning: {location} is read without its key: its restore points are NOT \
             authenticated (anyone who could write to it could have forged them)"
        );
        return Ok(Arc::new(protection));
    }
    // A long-running command (replicate --continuous) unlocks each cycle: the passphrase
    // is asked, and Argon2id run, once per process and repository.
    static UNLOCKED: std::sync::Mutex<Vec<(String, String, Arc<Protection>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut unlocked = UNLOCKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, p)) = unlocked
        .iter()
        .find(|(id, check, _)| *id == config.repository_id && *check == enc.key_check)
    {
        return Ok(p.clone());
    }
    let slots = slots()?;
    let protection = Arc::new(match &how.key_file {
        Some(path) => {
            let bytes = Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("reading key file {}", path.display()))?,
            );
            let key = keys::parse_key_file(&bytes)?;
            Protection::unlock(config, &slots, Secret::KeyFile(&key))?
        }
        None => {
            let passphrase = read_passphrase(how.password_file.as_deref(), "Passphrase: ")
                .map_err(|e| match (enc.mode, e.downcast::<Usage>()) {
                    (keys::Mode::Signed, Ok(Usage(m))) => Usage(format!(
                        "{m}; or add --unauthenticated to read this signed repository \
                         without checking its signatures"
                    ))
                    .into(),
                    (_, Ok(u)) => u.into(),
                    (_, Err(e)) => e,
                })?;
            Protection::unlock(config, &slots, Secret::Passphrase(passphrase.as_bytes()))?
        }
    });
    unlocked.push((
        config.repository_id.clone(),
        enc.key_check.clone(),
        protection.clone(),
    ));
    Ok(protection)
}

/// A repository read through its protection (directly when it has none).
pub fn protected_repository<S: StoreRead + 'static>(
    store: S,
    protection: Arc<Protection>,
) -> Repository {
    if protection.mode() == Mode::None {
        Repository::new(Box::new(store))
    } else {
        Repository::new(Box::new(Protected::new(store, protection)))
    }
}

/// A copy of a repository elsewhere (`url`: an S3 bucket, a standby host), unlocked with
/// `how` when its `config` says it is protected, with the key `slots` stored beside it,
/// and checked against what this client saw of it before (rollback, downgrade).
pub fn open_copy<S: StoreRead + 'static>(
    url: &str,
    store: S,
    config: &bkimg_format::store::local::RepoConfig,
    slots: impl FnOnce() -> Result<Vec<(String, Vec<u8>)>>,
    how: &Unlock,
) -> Result<Repository> {
    let protection = protection_with(url, config, slots, how)?;
    let repo = protected_repository(store, protection);
    crate::known::check(std::path::Path::new(url), config, &repo, how)?;
    Ok(repo)
}

/// [`protected_repository`] over a store shared with other users of it.
pub fn protected_repository_shared(
    store: Arc<LocalDir>,
    protection: Arc<Protection>,
) -> Repository {
    Repository::new(Box::new(Protected::new(store, protection)))
}

/// Cost of the Argon2id derivation of new passphrase slots.
#[derive(Args)]
pub struct KdfArgs {
    /// Argon2id memory in MiB [default: 256, about 0.5 s with 2 iterations on the
    /// reference machine].
    #[arg(long, value_name = "MIB")]
    pub kdf_memory_mib: Option<u32>,
    /// Argon2id passes over the memory [default: 2].
    #[arg(long, value_name = "N")]
    pub kdf_iterations: Option<u32>,
}

impl KdfArgs {
    fn params(&self) -> Argon2Params {
        let d = Argon2Params::DEFAULT;
        Argon2Params {
            memory_kib: self.kdf_memory_mib.map_or(d.memory_kib, |m| m << 10),
            iterations: self.kdf_iterations.unwrap_or(d.iterations),
            parallelism: d.parallelism,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum InitMode {
    /// Chunks, indexes and manifests encrypted and authenticated.
    Encrypted,
    /// Plaintext chunks; manifests and indexes authenticated (MAC).
    Signed,
}

#[derive(Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The first passphrase, from FILE (its first line) instead of asking twice on the
    /// terminal.
    #[arg(long, env = "BKIMG_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Also write a new key file (32 random bytes) to FILE and add a slot for it. Keep it
    /// off the backup target: with it, the repository opens without a passphrase.
    #[arg(long, value_name = "FILE")]
    pub key_file_out: Option<PathBuf>,
    /// No passphrase slot: the key file of --key-file-out is the only key.
    #[arg(long, requires = "key_file_out", conflicts_with = "password_file")]
    pub no_passphrase: bool,
    #[arg(long, value_enum, default_value = "encrypted")]
    pub mode: InitMode,
    #[command(flatten)]
    pub kdf: KdfArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub unlock: Unlock,
    /// The new slot's passphrase from FILE instead of asking twice on the terminal.
    #[arg(long, env = "BKIMG_NEW_PASSWORD_FILE", value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
    /// Add a key file slot instead: write a new key file (32 random bytes) to FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "new_password_file")]
    pub key_file_out: Option<PathBuf>,
    #[command(flatten)]
    pub kdf: KdfArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The slot to remove (its id from `bkimg key list`).
    #[arg(long, value_name = "ID")]
    pub slot: String,
    #[command(flatten)]
    pub unlock: Unlock,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct PasswdArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The current passphrase from FILE instead of asking on the terminal.
    #[arg(long, env = "BKIMG_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The new passphrase from FILE instead of asking twice on the terminal.
    #[arg(long, env = "BKIMG_NEW_PASSWORD_FILE", value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
    #[command(flatten)]
    pub kdf: KdfArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub common: Common,
}

impl KeyCommand {
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        let repo = match self {
            KeyCommand::Init(a) => &mut a.repo,
            KeyCommand::Add(a) => &mut a.repo,
            KeyCommand::Remove(a) => &mut a.repo,
            KeyCommand::Passwd(a) => &mut a.repo,
            KeyCommand::List(a) => &mut a.repo,
        };
        repo.settle(config)?;
        match repo.path().to_str() {
            Some(url) if url.starts_with("s3://") || url.starts_with("bkimg://") => Err(Usage(
                format!("bkimg key manages the keys of a local repository directory, not {url}"),
            )
            .into()),
            _ => Ok(()),
        }
    }
}

pub fn run(cmd: KeyCommand) -> Result<i32> {
    match cmd {
        KeyCommand::Init(a) => init(a),
        KeyCommand::Add(a) => add(a),
        KeyCommand::Remove(a) => remove(a),
        KeyCommand::Passwd(a) => passwd(a),
        KeyCommand::List(a) => list(a),
    }
}

fn init(args: InitArgs) -> Result<i32> {
    let root = args.repo.path();
    // Read every secret before touching the repository.
    let passphrase = if args.no_passphrase {
        None
    } else {
        Some(new_passphrase(args.password_file.as_deref())?)
    };
    if !LocalDir::is_repository(root) {
        let created = bkimg_format::time::now_rfc3339();
        LocalDir::open_or_create(root, &uuid::Uuid::new_v4().to_string(), &created)?;
    }
    let (store, mut config) = LocalDir::open_for_keys(root)?;
    if config.encryption.is_some() {
        return Err(Refused(format!(
            "{} is already encrypted: add a key with `bkimg key add --repo {}`",
            root.display(),
            root.display()
        ))
        .into());
    }
    if store.has_points()? {
        return Err(Refused(format!(
            "{} already holds restore points, which would stay unencrypted: `bkimg key init` \
             only turns a new or empty repository into an encrypted one; capture into a new \
             encrypted repository instead",
            root.display()
        ))
        .into());
    }
    // Slots of an earlier `key init` that was killed before it wrote the config wrap a
    // master key that never became this repository's.
    for (id, _) in store.key_slots()? {
        store.delete_key_slot(&id)?;
    }
    let master = Key::random();
    let keys = RepoKeys::derive(&master, &config.repository_id);
    let mode = match args.mode {
        InitMode::Encrypted => Mode::Encrypted,
        InitMode::Signed => Mode::Signed,
    };
    // Slots first, config last: a kill in between leaves an unencrypted, empty repository
    // with stray slots, and `key init` can run again.
    let mut made = Vec::new();
    if let Some(p) = &passphrase {
        made.push(put_slot(
            &store,
            &master,
            &config.repository_id,
            Secret::Passphrase(p.as_bytes()),
            args.kdf.params(),
        )?);
    }
    if let Some(path) = &args.key_file_out {
        let file = write_key_file(path)?;
        made.push(put_slot(
            &store,
            &master,
            &config.repository_id,
            Secret::KeyFile(&file),
            args.kdf.params(),
        )?);
    }
    config.encryption = Some(Encryption::new(mode, &keys, &config.repository_id));
    store.replace_config(&config)?;
    report(
        &args.common,
        &format!(
            "{} is now {} (key slots: {})",
            root.display(),
            match mode {
                Mode::Signed => "signed",
                _ => "encrypted",
            },
            made.iter().map(slot_line).collect::<Vec<_>>().join("; ")
        ),
        serde_json::json!({
            "repository": root.display().to_string(),
            "repository_id": config.repository_id,
            "mode": mode,
            "slots": made.iter().map(slot_json).collect::<Vec<_>>(),
        }),
    );
    Ok(exit::OK)
}

fn add(args: AddArgs) -> Result<i32> {
    let root = args.repo.path();
    let (store, config, slots) = open_encrypted(root)?;
    let (master, by) = unlock(&config, &slots, &args.unlock)?;
    let slot = if let Some(path) = &args.key_file_out {
        let file = write_key_file(path)?;
        put_slot(
            &store,
            &master,
            &config.repository_id,
            Secret::KeyFile(&file),
            args.kdf.params(),
        )?
    } else {
        let p = new_passphrase(args.new_password_file.as_deref())?;
        put_slot(
            &store,
            &master,
            &config.repository_id,
            Secret::Passphrase(p.as_bytes()),
            args.kdf.params(),
        )?
    };
    report(
        &args.common,
        &format!(
            "added key slot {} (unlocked by slot {by})",
            slot_line(&slot)
        ),
        slot_json(&slot),
    );
    Ok(exit::OK)
}

fn remove(args: RemoveArgs) -> Result<i32> {
    let root = args.repo.path();
    let (store, config, slots) = open_encrypted(root)?;
    if !slots.iter().any(|s| s.slot_id == args.slot) {
        return Err(FormatError::missing(format!("key slot {:?}", args.slot)).into());
    }
    if slots.len() == 1 {
        return Err(Refused(format!(
            "key slot {} is the last key of {}: removing it would make every restore point \
             unreadable; add another key first (`bkimg key add`)",
            args.slot,
            root.display()
        ))
        .into());
    }
    // Only someone who holds a key may remove one.
    unlock(&config, &slots, &args.unlock)?;
    store.delete_key_slot(&args.slot)?;
    report(
        &args.common,
        &format!("removed key slot {}", args.slot),
        serde_json::json!({ "removed": args.slot }),
    );
    Ok(exit::OK)
}

fn passwd(args: PasswdArgs) -> Result<i32> {
    let root = args.repo.path();
    let (store, config, slots) = open_encrypted(root)?;
    let unlock_args = Unlock {
        password_file: args.password_file.clone(),
        key_file: None,
        ..Unlock::default()
    };
    let (master, by) = unlock(&config, &slots, &unlock_args)?;
    let p = new_passphrase(args.new_password_file.as_deref())?;
    let old = slots
        .iter()
        .find(|s| s.slot_id == by)
        .expect("unlocked by one of them");
    let slot = Slot::create(
        &master,
        &config.repository_id,
        &by,
        &old.created,
        Secret::Passphrase(p.as_bytes()),
        args.kdf.params(),
    )?;
    // Rewritten in place (rename): the slot holds the old or the new passphrase, never none.
    store.put_key_slot(&by, &slot.encode())?;
    report(
        &args.common,
        &format!("changed the passphrase of key slot {by}"),
        slot_json(&slot),
    );
    Ok(exit::OK)
}

fn list(args: ListArgs) -> Result<i32> {
    let root = args.repo.path();
    let (_store, config, slots) = open_encrypted(root)?;
    let mode = config.encryption.as_ref().map(|e| e.mode);
    if args.common.json {
        out_json(&serde_json::json!({
            "repository_id": config.repository_id,
            "mode": mode,
            "aead": config.encryption.as_ref().map(|e| e.aead),
            "slots": slots.iter().map(slot_json).collect::<Vec<_>>(),
        }));
    } else {
        out(&format!(
            "{:<16}  {:<10}  {:<20}  KDF",
            "ID", "KIND", "CREATED"
        ));
        for s in &slots {
            out(&format!(
                "{:<16}  {:<10}  {:<20}  {}",
                s.slot_id,
                s.kind(),
                s.created,
                kdf_text(s)
            ));
        }
    }
    Ok(exit::OK)
}

/// Opens an encrypted repository for its keys and decodes every slot in keys/.
fn open_encrypted(
    root: &Path,
) -> Result<(LocalDir, bkimg_format::store::local::RepoConfig, Vec<Slot>)> {
    let (store, config) = LocalDir::open_for_keys(root)?;
    if config.encryption.is_none() {
        return Err(Refused(format!(
            "{} is not encrypted: `bkimg key init --repo {}` makes a new or empty repository \
             encrypted",
            root.display(),
            root.display()
        ))
        .into());
    }
    let slots = slots(&store, &config)?;
    Ok((store, config, slots))
}

/// Decodes every key slot in the repository's keys/.
fn slots(store: &LocalDir, config: &bkimg_format::store::local::RepoConfig) -> Result<Vec<Slot>> {
    decode_slots(store.key_slots()?, config)
}

fn decode_slots(
    raw: Vec<(String, Vec<u8>)>,
    config: &bkimg_format::store::local::RepoConfig,
) -> Result<Vec<Slot>> {
    let mut slots = Vec::new();
    for (id, bytes) in raw {
        let slot = Slot::decode(&bytes).with_context(|| format!("reading key slot {id}"))?;
        slot.check_stored_as(&id, &config.repository_id)?;
        slots.push(slot);
    }
    Ok(slots)
}

/// The master key from the first slot the secret unlocks, and that slot's id.
fn unlock(
    config: &bkimg_format::store::local::RepoConfig,
    slots: &[Slot],
    how: &Unlock,
) -> Result<(Key, String)> {
    how.refuse_unauthenticated("bkimg key")?;
    let enc = config
        .encryption
        .as_ref()
        .expect("checked by open_encrypted");
    let (secret_kind, key_file, passphrase);
    if let Some(path) = &how.key_file {
        let bytes = Zeroizing::new(
            std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?,
        );
        key_file = Some(keys::parse_key_file(&bytes)?);
        passphrase = None;
        secret_kind = "key-file";
    } else {
        passphrase = Some(read_passphrase(
            how.password_file.as_deref(),
            "Passphrase: ",
        )?);
        key_file = None;
        secret_kind = "passphrase";
    }
    for slot in slots.iter().filter(|s| s.kind() == secret_kind) {
        let secret = match (&key_file, &passphrase) {
            (Some(k), _) => Secret::KeyFile(k),
            (None, Some(p)) => Secret::Passphrase(p.as_bytes()),
            (None, None) => unreachable!("one of them is set"),
        };
        match slot.unlock(secret) {
            Ok(master) => {
                enc.keys(&master, &config.repository_id)?;
                return Ok((master, slot.slot_id.clone()));
            }
            Err(FormatError::Denied(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(FormatError::Denied(format!(
        "the {} unlocks none of the {} key slots of this repository",
        if key_file.is_some() {
            "key file"
        } else {
            "passphrase"
        },
        slots.iter().filter(|s| s.kind() == secret_kind).count()
    ))
    .into())
}

fn put_slot(
    store: &LocalDir,
    master: &Key,
    repository_id: &str,
    secret: Secret,
    params: Argon2Params,
) -> Result<Slot> {
    let slot = Slot::create(
        master,
        repository_id,
        &keys::new_slot_id(),
        &bkimg_format::time::now_rfc3339(),
        secret,
        params,
    )?;
    store.put_key_slot(&slot.slot_id, &slot.encode())?;
    Ok(slot)
}

/// A new key file (mode 0600, never overwriting an existing file).
fn write_key_file(path: &Path) -> Result<Key> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = Key::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {} (it must not exist)", path.display()))?;
    f.write_all(key.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing key file {}", path.display()))?;
    Ok(key)
}

/// A passphrase from a file (its first line) or asked without echo on the terminal.
fn read_passphrase(file: Option<&Path>, question: &str) -> Result<Zeroizing<String>> {
    let text = match file {
        Some(path) => {
            let bytes = Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("reading password file {}", path.display()))?,
            );
            let text = std::str::from_utf8(&bytes)
                .with_context(|| format!("password file {} is not UTF-8", path.display()))?;
            Zeroizing::new(text.lines().next().unwrap_or("").to_string())
        }
        None => ask_secret(question)?,
    };
    if text.is_empty() {
        bail!(Usage("the passphrase is empty".into()));
    }
    Ok(text)
}

/// A new passphrase: from a file, or typed twice.
fn new_passphrase(file: Option<&Path>) -> Result<Zeroizing<String>> {
    if file.is_some() {
        return read_passphrase(file, "");
    }
    let first = read_passphrase(None, "New passphrase: ")?;
    let again = read_passphrase(None, "Repeat the new passphrase: ")?;
    if first != again {
        bail!(Usage("the two passphrases differ".into()));
    }
    Ok(first)
}

/// Asks on the controlling terminal with echo off. The terminal is read a byte at a time
/// with signals off, so that Ctrl-C cancels (exit 130) with its settings restored rather
/// than killing bkimg with echo still off.
fn ask_secret(question: &str) -> Result<Zeroizing<String>> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg, SpecialCharacterIndices};
    use std::io::Read;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            Usage(
                "no terminal to ask for the passphrase on: give --password-file FILE or set \
                 BKIMG_PASSWORD_FILE (or --key-file)"
                    .into(),
            )
        })?;
    let old = tcgetattr(&tty).context("reading the terminal's settings")?;
    let mut quiet = old.clone();
    quiet
        .local_flags
        .remove(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG);
    quiet.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    quiet.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    tcsetattr(&tty, SetArg::TCSAFLUSH, &quiet).context("turning the terminal's echo off")?;
    let answer = (|| {
        (&tty).write_all(question.as_bytes())?;
        let mut line = Zeroizing::new(Vec::new());
        let mut byte = [0u8; 1];
        loop {
            if (&tty).read(&mut byte)? == 0 {
                break;
            }
            match byte[0] {
                b'\n' | b'\r' => break,
                // Ctrl-C, or Ctrl-D on an empty line.
                0x03 => return Ok(None),
                0x04 if line.is_empty() => return Ok(None),
                0x7f | 0x08 => {
                    // Backspace removes one character (UTF-8 continuation bytes too).
                    while let Some(b) = line.pop() {
                        if b & 0xc0 != 0x80 {
                            break;
                        }
                    }
                }
                0x15 => line.clear(), // Ctrl-U
                b => line.push(b),
            }
        }
        Ok::<_, std::io::Error>(Some(line))
    })();
    let _ = tcsetattr(&tty, SetArg::TCSAFLUSH, &old);
    let _ = (&tty).write_all(b"\n");
    match answer.context("reading the passphrase from the terminal")? {
        None => Err(anyhow::Error::new(exit::Interrupted).context("no passphrase given")),
        Some(bytes) => Ok(Zeroizing::new(
            String::from_utf8(bytes.to_vec()).context("the passphrase is not UTF-8")?,
        )),
    }
}

fn kdf_text(s: &Slot) -> String {
    match s.kdf.params() {
        Some(p) => format!(
            "argon2id m={}MiB t={} p={}",
            p.memory_kib >> 10,
            p.iterations,
            p.parallelism
        ),
        None => "hkdf-sha256 (key file)".into(),
    }
}

fn slot_line(s: &Slot) -> String {
    format!("{} {} ({})", s.slot_id, s.kind(), kdf_text(s))
}

fn slot_json(s: &Slot) -> serde_json::Value {
    serde_json::json!({
        "id": s.slot_id,
        "kind": s.kind(),
        "created": s.created,
        "kdf": match s.kdf.params() {
            Some(p) => serde_json::json!({
                "algorithm": "argon2id",
                "memory_kib": p.memory_kib,
                "iterations": p.iterations,
                "parallelism": p.parallelism,
            }),
            None => serde_json::json!({ "algorithm": "hkdf-sha256" }),
        },
    })
}

fn report(common: &Common, text: &str, json: serde_json::Value) {
    if common.json {
        out_json(&json);
    } else if !common.quiet {
        out(text);
    }
}
