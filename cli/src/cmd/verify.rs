//! `bkimg verify`: read and check every object; exit 3 if anything is damaged.

use anyhow::Result;
use clap::Args;
use indicatif::HumanBytes;

use crate::config::{Config, RepoArgs};
use crate::progress::Bar;
use crate::{exit, io_workers, open_repository, out_json, Common};

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore points to verify (default: all).
    pub ids: Vec<String>,
    /// Chunks read and checked at once (default: 4 per CPU; 32 for s3://; 16 for
    /// bkimg://; or `threads` in the config file).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: VerifyArgs, config: &Config) -> Result<i32> {
    let VerifyArgs {
        repo,
        ids,
        threads,
        standby,
        unlock,
        common,
    } = args;
    let workers = io_workers(threads, repo.path());
    let repo = open_repository(repo.path(), &standby, &unlock, workers, config)?;
    let bar = Bar::new(common.quiet || common.json);
    let report = bkimg_restore::verify::verify(&repo, &ids, workers, &bar);
    bar.finish();
    let report = report?;
    if common.json {
        out_json(&serde_json::to_value(&report)?);
    } else {
        for p in &report.problems {
            let mut at = p.point.clone();
            for part in [&p.disk, &p.volume].into_iter().flatten() {
                at.push_str(&format!(" {part}"));
            }
            if let Some(o) = p.offset {
                at.push_str(&format!(" at byte {o}"));
            }
            eprintln!("DAMAGED: {at}: {}", p.error);
        }
        eprintln!(
            "{} restore point(s), {} chunks ({}) checked, {} problem(s)",
            report.points.len(),
            report.chunks_checked,
            HumanBytes(report.bytes_checked),
            report.problems.len()
        );
    }
    Ok(if report.problems.is_empty() {
        exit::OK
    } else {
        exit::DAMAGED
    })
}
