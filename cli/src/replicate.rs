//! `bkimg replicate`: ship restore points to S3 or to a standby host.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::progress::Bar;
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
    pub s3: crate::s3cmd::S3Args,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub continuous: crate::continuous::ContinuousArgs,
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

/// What one replication run did, and where to.
pub struct Shipped {
    pub report: bkimg_replicate::ShipReport,
    pub target: String,
    /// Fields of the JSON summary that only this kind of target has.
    pub extra: serde_json::Value,
}

/// Ships once to the target `--to` names; `quiet`: no progress bar.
pub fn ship(args: &ReplicateArgs, quiet: bool) -> Result<Shipped> {
    let bar = Bar::new(quiet);
    let shipped = if args.to.starts_with("s3://") {
        crate::s3cmd::ship(args, &bar)
    } else if args.to.starts_with("bkimg://") {
        crate::standby::ship(args, &bar)
    } else {
        bail!(
            "--to {:?}: name s3://BUCKET[/PREFIX] or bkimg://HOST:PORT",
            args.to
        )
    };
    bar.finish();
    shipped
}

pub fn run(args: ReplicateArgs) -> Result<i32> {
    if args.continuous.continuous {
        return crate::continuous::run(&args);
    }
    if !args.continuous.sources.is_empty() || args.continuous.every.is_some() {
        bail!("SOURCEs and --every go with --continuous (plain replicate ships what --repo holds)");
    }
    if !args.continuous.keep.is_empty() {
        bail!(
            "--keep-* rules go with --continuous; to prune now, run `bkimg prune --repo DIR` \
             (and `bkimg prune --repo s3://...` for the target) with the same rules"
        );
    }
    let Shipped {
        report,
        target,
        extra,
    } = ship(&args, args.common.quiet || args.common.json)?;
    if args.common.json {
        let mut v = serde_json::to_value(&report).context("report as JSON")?;
        v["target"] = json!(target);
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        crate::out_json(&v);
    } else {
        eprintln!(
            "{target}: sent {} restore point(s) ({} already there), {} chunks ({} already there), {} in {:.1} s",
            report.points_sent.len(),
            report.points_present,
            report.chunks_sent,
            report.chunks_present,
            crate::human(report.bytes_sent),
            report.seconds
        );
        for id in &report.points_sent {
            crate::out(id);
        }
    }
    Ok(crate::exit::OK)
}
