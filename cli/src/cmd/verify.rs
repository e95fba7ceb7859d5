//! `bkimg verify`: read and check every object; exit 3 if anything is damaged.

use anyhow::Result;
use clap::Args;
use indicatif::HumanBytes;

use crate::config::{Config, RepoArgs};
use crate::exit::Usage;
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
    /// For an s3:// repository: send every chunk found damaged or missing there again
    /// from the local repository it was replicated from, then verify again.
    #[arg(long, value_name = "LOCAL_REPO")]
    pub repair_from: Option<std::path::PathBuf>,
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
        repair_from,
        standby,
        unlock,
        common,
    } = args;
    let location = repo.path();
    let workers = io_workers(threads, location);
    let url = location.to_str().filter(|u| u.starts_with("s3://"));
    if let (Some(_), None) = (&repair_from, url) {
        return Err(Usage(
            "--repair-from repairs an s3:// repository from a local one; verify a local \
             repository or export without it"
                .into(),
        )
        .into());
    }
    let repo = open_repository(location, &standby, &unlock, workers, config)?;
    let bar = Bar::new(common.quiet || common.json);
    let report = bkimg_restore::verify::verify(&repo, &ids, workers, &bar);
    bar.finish();
    let mut report = report?;
    let mut repair = None;
    if let (Some(from), Some(url)) = (&repair_from, url) {
        if !report.problems.is_empty() {
            let r = self::repair(url, from, &report, &unlock, workers, config, &common)?;
            // What the bucket holds now.
            let bar = Bar::new(common.quiet || common.json);
            let again = bkimg_restore::verify::verify(&repo, &ids, workers, &bar);
            bar.finish();
            report = again?;
            repair = Some(r);
        }
    }
    if common.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(r) = &repair {
            v["repaired"] = serde_json::to_value(r)?;
        }
        out_json(&v);
    } else {
        if let Some(r) = &repair {
            eprintln!(
                "repair: {} chunk(s) sent again from {}{}",
                r.chunks_sent,
                r.from,
                if r.not_in_local.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} damaged chunk(s) are not in it either",
                        r.not_in_local.len()
                    )
                }
            );
        }
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

/// What `--repair-from` did.
#[derive(serde::Serialize)]
struct Repair {
    from: String,
    chunks_sent: u64,
    /// Damaged chunks the local repository lacks too (pruned there, or never captured in
    /// it): the problems verify reports again name them.
    not_in_local: Vec<String>,
}

/// Sends the chunks `report` names damaged or missing in the bucket `url` again from the
/// local repository `from`, which must be the same repository (its id).
fn repair(
    url: &str,
    from: &std::path::Path,
    report: &bkimg_restore::verify::VerifyReport,
    unlock: &crate::cmd::key::Unlock,
    workers: usize,
    config: &Config,
    common: &Common,
) -> Result<Repair> {
    use anyhow::Context;
    use bkimg_format::store::LocalDir;
    use bkimg_format::Digest;
    let store =
        bkimg_replicate::s3::S3Store::open(url, &crate::prune::s3_settings(None, &config.s3))?;
    let remote = store.config(true)?;
    let (local, local_config) = LocalDir::open_any(from)
        .with_context(|| format!("opening {} to repair {url} from", from.display()))?;
    if local_config.repository_id != remote.repository_id {
        return Err(Usage(format!(
            "{} is repository {}, but {url} is repository {}: --repair-from names the \
             local repository that was replicated there",
            from.display(),
            local_config.repository_id,
            remote.repository_id
        ))
        .into());
    }
    let protection = crate::cmd::key::protection(&local, &local_config, unlock)?;
    let local = std::sync::Arc::new(local);
    let src = crate::cmd::key::protected_repository_shared(local.clone(), protection);
    let mut damaged: Vec<Digest> = report
        .problems
        .iter()
        .filter_map(|p| p.chunk.as_deref().and_then(Digest::from_hex))
        .collect();
    damaged.sort();
    damaged.dedup();
    let bar = Bar::new(common.quiet || common.json);
    let sent =
        bkimg_replicate::s3::resend_chunks(&src, local.as_ref(), &store, &damaged, workers, &bar);
    bar.finish();
    let (chunks_sent, lacking) = sent?;
    Ok(Repair {
        from: from.display().to_string(),
        chunks_sent,
        not_in_local: lacking.iter().map(Digest::to_hex).collect(),
    })
}
