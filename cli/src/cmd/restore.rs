//! `bkimg restore`: a restore point onto disks or image files, after a plan and a
//! confirmation.

use std::io::IsTerminal;

use anyhow::Result;
use bkimg_format::repo::Point;
use bkimg_restore::RestoreRequest;
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs};
use crate::progress::Bar;
use crate::{exit, io_workers, open_repository, out, out_json, Common};

#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point id, unique id prefix, or "latest".
    #[arg(default_value = "latest")]
    pub id: String,
    /// Disk or image file to write ("DISK=PATH" per disk for multi-disk restore points).
    /// A missing path becomes a sparse image file of the source disk's size.
    #[arg(long, required = true)]
    pub target: Vec<String>,
    /// Restore one volume ("p2", "2", "gap0", "whole") to the target instead of the whole disk.
    #[arg(long)]
    pub volume: Option<String>,
    /// Print what would be written and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask before overwriting a block device.
    #[arg(long)]
    pub yes: bool,
    /// Chunks read at once (default: 4 per CPU; 32 for s3://; 16 for bkimg://; or
    /// `threads` in the config file).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub standby: crate::standby::StandbyArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: RestoreArgs, config: &Config) -> Result<i32> {
    let RestoreArgs {
        repo,
        id,
        target,
        volume,
        dry_run,
        yes,
        threads,
        standby,
        unlock,
        common,
    } = args;
    let workers = io_workers(threads, repo.path());
    let repo = open_repository(repo.path(), &standby, &unlock, workers, config)?;
    let point = repo.resolve(&id)?;
    let req = RestoreRequest {
        targets: bkimg_restore::match_targets(&point, &target)?,
        volume,
        workers,
    };
    let plan = bkimg_restore::plan(&point, &req)?;
    if dry_run {
        // Refuse now what the real restore would refuse.
        bkimg_restore::check_targets(&point, &req)?;
        if common.json {
            out_json(&json!({ "id": point.manifest.id, "dry_run": true, "disks": plan }));
        } else {
            print_plan(&point, &plan);
        }
        return Ok(exit::OK);
    }
    confirm_devices(&req, &point, yes)?;
    let bar = Bar::new(common.quiet || common.json);
    let started = std::time::Instant::now();
    let report = bkimg_restore::restore(&repo, &point, &req, &bar);
    bar.finish();
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
    if common.json {
        out_json(
            &json!({ "id": point.manifest.id, "seconds": secs, "disks": plan, "report": report }),
        );
    } else {
        eprintln!(
            "restored {} to {}: wrote {}, {} chunks verified, in {secs:.1} s",
            point.manifest.id,
            req.targets
                .iter()
                .map(|(d, p)| format!("{d}={}", p.display()))
                .collect::<Vec<_>>()
                .join(", "),
            HumanBytes(report.bytes_written),
            report.chunks_verified
        );
    }
    Ok(exit::OK)
}

fn confirm_devices(req: &RestoreRequest, point: &Point, yes: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for (disk, path) in &req.targets {
        let is_dev = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if !is_dev || yes {
            continue;
        }
        if !std::io::stdin().is_terminal() {
            return Err(exit::Refused(format!(
                "{} is a block device: add --yes to overwrite it (not asking: stdin is not a terminal)",
                path.display()
            ))
            .into());
        }
        eprint!(
            "Overwrite ALL data on {} with {} of restore point {}? Type 'yes': ",
            path.display(),
            disk,
            point.manifest.id
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            return Err(
                exit::Refused(format!("not confirmed: {} left untouched", path.display())).into(),
            );
        }
    }
    Ok(())
}

fn print_plan(point: &Point, plan: &[bkimg_restore::DiskPlan]) {
    out(&format!(
        "restore point {} (dry run: nothing is written)",
        point.manifest.id
    ));
    for d in plan {
        out(&format!(
            "  {} -> {} (needs {}), partition table: {}",
            d.disk,
            d.target,
            HumanBytes(d.source_size),
            d.table
        ));
        for v in &d.volumes {
            out(&format!(
                "    {:<6} at {:>12} {:>10}: {}",
                v.volume,
                v.target_offset,
                HumanBytes(v.size),
                v.action
            ));
        }
    }
}
