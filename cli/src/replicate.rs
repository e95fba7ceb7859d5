//! `bkimg replicate`: ship restore points to S3 or to a standby host.

use anyhow::{Context, Result};
use bkimg_replicate::target::{Target, TargetSettings};
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs, S3Config};
use crate::progress::Bar;
use crate::Common;

#[derive(Args)]
pub struct ReplicateArgs {
    /// The local repository whose restore points are shipped.
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Where to: s3://BUCKET[/PREFIX] or bkimg://HOST:PORT (a standby host).
    #[arg(long)]
    pub to: String,
    /// S3 endpoint URL (default: the AWS chain, e.g. AWS_ENDPOINT_URL, then the config
    /// file's).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Restore points to ship, with their ancestors (default: all).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Bandwidth limit in bytes per second, e.g. 500K, 20M, 1GiB (K, M, G are powers of
    /// 1024).
    #[arg(long, value_name = "RATE", value_parser = crate::units::size)]
    pub bwlimit: Option<u64>,
    /// Requests in flight at once (S3 default: 16, or `threads` in the config file).
    #[arg(long, alias = "parallel", value_name = "N")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub s3: crate::s3cmd::S3Args,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    /// The config file's [s3] section.
    #[arg(skip)]
    pub s3_config: S3Config,
    #[command(flatten)]
    pub common: Common,
}

impl ReplicateArgs {
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        self.repo.settle(config)?;
        self.repo.require_local(
            "replicate",
            "--repo names the local repository to ship from (and --to where to); to copy a \
             restore point out of a standby, restore or export it",
        )?;
        self.threads = config.threads(self.threads);
        self.standby.settle(&config.standby);
        self.s3_config = config.s3.clone();
        Ok(())
    }

    pub fn options(&self) -> bkimg_replicate::ReplicateOptions {
        bkimg_replicate::ReplicateOptions {
            ids: self.ids.clone(),
            bandwidth: self.bwlimit,
            parallel: self.threads,
        }
    }

    pub fn s3_settings(&self) -> bkimg_replicate::s3::S3Settings {
        crate::prune::s3_settings(self.endpoint.as_deref(), &self.s3_config)
    }
}

pub use bkimg_replicate::target::Shipped;

impl ReplicateArgs {
    /// The target `--to` names, with the settings it needs.
    pub fn target(&self) -> Result<Target> {
        Target::from_url(
            &self.to,
            TargetSettings {
                s3: self.s3_settings(),
                object_lock_days: self.s3.object_lock_days,
                key: self.standby.key.clone(),
                server_fingerprint: self.standby.server_fingerprint.clone(),
                retries: self.standby.retries,
                timeout: self.standby.timeout,
            },
        )
    }
}

/// Ships once to the target `--to` names; `quiet`: no progress bar.
pub fn ship(args: &ReplicateArgs, quiet: bool) -> Result<Shipped> {
    args.unlock.refuse_unauthenticated("replicate")?;
    let bar = Bar::new(quiet);
    let shipped = args.target().and_then(|t| {
        t.ship(
            args.repo.path(),
            &|local, config| crate::cmd::key::protection(local, config, &args.unlock),
            &args.options(),
            &bar,
        )
    });
    bar.finish();
    shipped
}

/// Ships once (`bkimg replicate` without --continuous).
pub fn run(args: ReplicateArgs) -> Result<i32> {
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
            HumanBytes(report.bytes_sent),
            report.seconds
        );
        for id in &report.points_sent {
            crate::out(id);
        }
    }
    Ok(crate::exit::OK)
}
