//! The targets a repository is shipped to, opened from what a caller names: an S3 bucket
//! (`s3://BUCKET[/PREFIX]`) or a standby host (`bkimg://HOST:PORT`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bkimg_format::progress::Progress;
use bkimg_format::repo::Repository;
use serde_json::json;

use crate::s3::{S3Settings, S3Store};
use bkimg_format::protect::Protection;
use bkimg_format::store::local::RepoConfig;
use bkimg_format::store::{LocalDir, Protected};
use std::sync::Arc;

/// Unlocks a protected local repository (the CLI asks for its passphrase or reads its key
/// file); returns the protection to read it through (none for an unprotected one).
pub type Unlocker<'a> = &'a dyn Fn(&LocalDir, &RepoConfig) -> Result<Arc<Protection>>;
use crate::standby::client::StoredForm;
use crate::standby::{self, tls, ClientConfig};
use crate::{ReplicateOptions, ShipReport};

/// Where restore points are shipped.
#[derive(Clone, Debug)]
pub enum Target {
    S3 {
        url: String,
        settings: S3Settings,
        /// Keep every object uploaded undeletable for this many days (Object Lock).
        object_lock_days: Option<u32>,
    },
    Standby {
        url: String,
        /// Key directory of this host.
        key: Option<PathBuf>,
        server_fingerprint: Option<String>,
        retries: u32,
        timeout: Duration,
    },
}

/// What one replication run did, and where to.
pub struct Shipped {
    pub report: ShipReport,
    pub target: String,
    /// Fields of the JSON summary that only this kind of target has.
    pub extra: serde_json::Value,
}

/// The S3 and standby settings a target may need; [`Target::from_url`] picks by URL.
#[derive(Clone, Debug)]
pub struct TargetSettings {
    pub s3: S3Settings,
    pub object_lock_days: Option<u32>,
    pub key: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub retries: u32,
    pub timeout: Duration,
}

impl Target {
    /// The target `url` names.
    pub fn from_url(url: &str, settings: TargetSettings) -> Result<Target> {
        if url.starts_with("s3://") {
            Ok(Target::S3 {
                url: url.to_string(),
                settings: settings.s3,
                object_lock_days: settings.object_lock_days,
            })
        } else if url.starts_with("bkimg://") {
            Ok(Target::Standby {
                url: url.to_string(),
                key: settings.key,
                server_fingerprint: settings.server_fingerprint,
                retries: settings.retries,
                timeout: settings.timeout,
            })
        } else {
            bail!("--to {url:?}: name s3://BUCKET[/PREFIX] or bkimg://HOST:PORT")
        }
    }

    /// Ships the restore points of the local repository `repo` that the target lacks.
    /// A protected repository is read through the key `unlock` gives (spec/format.md
    /// §18): its objects go to S3 or the standby as they are stored, sealed, with its
    /// config and key slots.
    pub fn ship(
        &self,
        repo: &Path,
        unlock: Unlocker<'_>,
        options: &ReplicateOptions,
        progress: &dyn Progress,
    ) -> Result<Shipped> {
        match self {
            Target::S3 {
                url,
                settings,
                object_lock_days,
            } => {
                let config_path = repo.join("config");
                let config = std::fs::read(&config_path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        anyhow::Error::from(bkimg_format::FormatError::NotRepository(format!(
                            "{} is not a bkimg repository directory (no config file): --repo \
                             names the local repository to ship",
                            repo.display()
                        )))
                    } else {
                        anyhow::Error::from(e).context(format!("reading {}", config_path.display()))
                    }
                })?;
                let (local, repo_config) = LocalDir::open_any(repo)?;
                let protection = unlock(&local, &repo_config)?;
                let local = Arc::new(local);
                let src = Repository::new(Box::new(Protected::new(local.clone(), protection)));
                let mut store = S3Store::open(url, settings)?;
                if let Some(days) = object_lock_days {
                    store.enable_object_lock(*days)?;
                }
                store.ensure_config(&config)?;
                if repo_config.encryption.is_some() {
                    store.sync_key_slots(&local.key_slots()?)?;
                }
                let report = crate::s3::replicate(&src, local.as_ref(), &store, options, progress)?;
                Ok(Shipped {
                    report,
                    target: store.url(),
                    extra: json!({ "requests": store.requests() }),
                })
            }
            Target::Standby {
                url,
                key,
                server_fingerprint,
                retries,
                timeout,
            } => {
                let key = key.as_ref().context(
                    "--key DIR is needed for a standby target, or `key` in the config file's \
                     [standby] (make one with `bkimg standby keygen --dir DIR`)",
                )?;
                let fp = server_fingerprint.as_ref().context(
                    "--server-fingerprint FP is needed for a standby target, or \
                     `server-fingerprint` in the config file's [standby] (keygen on the \
                     standby prints it)",
                )?;
                let (local, repo_config) = LocalDir::open_any(repo)?;
                let protection = unlock(&local, &repo_config)?;
                let local = Arc::new(local);
                let src = Repository::new(Box::new(Protected::new(local.clone(), protection)));
                let stored = match repo_config.encryption {
                    Some(_) => Some(StoredForm {
                        config: std::fs::read(repo.join("config"))
                            .with_context(|| format!("reading {}/config", repo.display()))?,
                        key_slots: local.key_slots()?,
                        local,
                    }),
                    None => None,
                };
                let cfg = ClientConfig {
                    address: ClientConfig::address_of(url)?,
                    identity: tls::Identity::load(key)?,
                    server_fingerprint: tls::Fingerprint::parse(fp)?,
                    retries: *retries,
                    timeout: *timeout,
                };
                let report = standby::replicate(&src, stored.as_ref(), &cfg, options, progress)?;
                Ok(Shipped {
                    report,
                    target: url.clone(),
                    extra: json!({}),
                })
            }
        }
    }
}
