//! S3 targets for `bkimg replicate` and the read commands (`list`, `info`, `verify`,
//! `restore`, `export` on `s3://BUCKET/PREFIX`). Set-up: docs/replication-s3.md.

use anyhow::Result;
use bkimg_format::repo::Repository;
use bkimg_replicate::s3::{S3Settings, S3Store};
use clap::Args;
use serde_json::json;

use crate::progress::Bar;
use crate::replicate::{ReplicateArgs, Shipped};

/// Options of `bkimg replicate` that only S3 targets use.
#[derive(Args)]
pub struct S3Args {
    /// S3 Object Lock: keep every object uploaded by this run undeletable for DAYS
    /// (COMPLIANCE mode); the bucket must have Object Lock enabled.
    #[arg(long, value_name = "DAYS")]
    pub object_lock_days: Option<u32>,
}

/// Ships to an S3 target; returns the run's report and the JSON fields only S3 has.
pub fn ship(args: &ReplicateArgs, bar: &Bar) -> Result<Shipped> {
    let config_path = args.repo.path().join("config");
    let config = std::fs::read(&config_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::Error::from(bkimg_format::FormatError::NotRepository(format!(
                "{} is not a bkimg repository directory (no config file): --repo names the \
                 local repository to ship",
                args.repo.path().display()
            )))
        } else {
            anyhow::Error::from(e).context(format!("reading {}", config_path.display()))
        }
    })?;
    let src = Repository::open(args.repo.path())?;
    let mut store = S3Store::open(&args.to, &args.s3_settings())?;
    if let Some(days) = args.s3.object_lock_days {
        store.enable_object_lock(days)?;
    }
    store.ensure_config(&config)?;
    let report = bkimg_replicate::s3::replicate(&src, &store, &args.options(), bar)?;
    Ok(Shipped {
        report,
        target: store.url(),
        extra: json!({ "requests": store.requests() }),
    })
}

/// A repository in a bucket, for the read commands. Endpoint and credentials come from
/// the AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles...), then `settings`.
pub fn open(url: &str, settings: &S3Settings) -> Result<Repository> {
    let store = S3Store::open(url, settings)?;
    // Wrong credentials, a missing repository or an endpoint that is down show here,
    // with their exit codes, rather than halfway through a command.
    store.check_config()?;
    Ok(Repository::new(Box::new(store)))
}
