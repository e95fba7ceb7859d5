//! `bkimg replicate`: ship restore points to S3 or to a standby host.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::Common;

#[derive(Args)]
pub struct ReplicateArgs {
    /// The local repository whose restore points are shipped.
    #[arg(long)]
    pub repo: PathBuf,
    /// Where to: s3://BUCKET[/PREFIX] or bkimg://HOST:PORT (a standby host).
    #[arg(long)]
    pub to: String,
    /// S3 endpoint URL (default: the AWS chain, e.g. AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Restore points to ship, with their ancestors (default: all).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Bandwidth limit, bytes per second with an optional K/M/G suffix (powers of 1024).
    #[arg(long, value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    pub parallel: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

impl ReplicateArgs {
    pub fn options(&self) -> bkimg_replicate::ReplicateOptions {
        bkimg_replicate::ReplicateOptions {
            ids: self.ids.clone(),
            bandwidth: self.bwlimit,
            parallel: self.parallel,
        }
    }
}

/// "10M" → 10 MiB/s.
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a rate: give bytes per second, e.g. 500K or 20M"))
}

pub fn run(args: ReplicateArgs) -> Result<i32> {
    if args.to.starts_with("s3://") {
        crate::s3cmd::replicate(&args)
    } else if args.to.starts_with("bkimg://") {
        crate::standby::replicate(&args)
    } else {
        bail!(
            "--to {:?}: name s3://BUCKET[/PREFIX] or bkimg://HOST:PORT",
            args.to
        )
    }
}
