//! S3 targets for `bkimg replicate` and the read commands (`list`, `info`, `verify`,
//! `restore`, `export` on `s3://BUCKET/PREFIX`). Set-up: docs/replication-s3.md.

use anyhow::Result;
use bkimg_format::repo::Repository;
use bkimg_replicate::s3::{S3Settings, S3Store};
use clap::Args;

use crate::cmd::key::Unlock;

/// Options of `bkimg replicate` that only S3 targets use.
#[derive(Args)]
pub struct S3Args {
    /// S3 Object Lock: keep every object uploaded by this run undeletable for DAYS
    /// (COMPLIANCE mode); the bucket must have Object Lock enabled.
    #[arg(long, value_name = "DAYS")]
    pub object_lock_days: Option<u32>,
}

/// A repository in a bucket, for the read commands. Endpoint and credentials come from
/// the AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles...), then `settings`.
///
/// A protected repository (encrypted or signed) is read through the key `unlock` gives,
/// with the key slots replicated beside it, and checked against what this client saw of
/// it before (rollback, downgrade).
pub fn open(url: &str, settings: &S3Settings, unlock: &Unlock) -> Result<Repository> {
    let store = S3Store::open(url, settings)?;
    // Wrong credentials, a missing repository or an endpoint that is down show here,
    // with their exit codes, rather than halfway through a command.
    let config = store.config(true)?;
    let slots = match config.encryption {
        Some(_) => store.key_slots()?,
        None => Vec::new(),
    };
    crate::cmd::key::open_copy(url, store, &config, || Ok(slots), unlock)
}
