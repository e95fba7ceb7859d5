//! `bkimg prune`: delete the restore points a retention policy no longer keeps, and the
//! chunks and indexes only they used, in a local repository or an S3 one.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use bkimg_format::prune::{self, Decision, Policy, PruneReport};
use bkimg_format::repo::Repository;
use bkimg_format::store::{LocalDir, StoreMaintain};
use bkimg_replicate::s3::{LockKind, S3Store};
use bkimg_replicate::standby::replica;
use clap::Args;
use serde_json::json;

use crate::{out, out_json, Common};

/// Which restore points to keep; every option adds to the kept set. The newest point of
/// each machine is always kept.
#[derive(Args, Clone, Default)]
pub struct KeepArgs {
    /// Keep the newest N restore points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: usize,
    /// ... of each of the last N days (UTC).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: usize,
    /// ... of each of the last N weeks (Monday to Sunday, UTC).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: usize,
    /// ... of each of the last N months (UTC).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: usize,
    /// Keep every point younger than this (e.g. 36h, 7d, 4w).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub keep_within: Option<Duration>,
    /// Keep this restore point (id or unique prefix; repeat).
    #[arg(long = "keep", value_name = "ID")]
    pub keep_ids: Vec<String>,
}

impl KeepArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            within_secs: self.keep_within.map(|d| d.as_secs()),
            pinned: self.keep_ids.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policy().is_empty()
    }
}

#[derive(Args)]
pub struct PruneArgs {
    /// Repository directory or s3://BUCKET[/PREFIX].
    #[arg(long)]
    pub repo: PathBuf,
    /// S3 endpoint URL (else the AWS chain: AWS_ENDPOINT_URL, profiles...).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Say what would be deleted and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait for captures, restores and replications using the repository to finish
    /// instead of refusing (exit 10).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub common: Common,
}

/// "36h", "7d", "4w", or anything `--every` takes.
fn parse_age(s: &str) -> std::result::Result<Duration, String> {
    for (unit, secs) in [("d", 86_400u64), ("w", 7 * 86_400)] {
        if let Some(n) = s.strip_suffix(unit) {
            let n: u64 = n
                .parse()
                .map_err(|_| format!("{s:?} is not an age: give e.g. 36h, 7d or 4w"))?;
            return Ok(Duration::from_secs(n * secs));
        }
    }
    crate::continuous::parse_duration(s)
}

pub fn run(args: &PruneArgs) -> Result<i32> {
    if args.keep.is_empty() {
        bail!(
            "say what to keep: --keep-last N, --keep-hourly/--keep-daily/--keep-weekly/\
             --keep-monthly N, --keep-within AGE or --keep ID (add --dry-run to see the \
             outcome first)"
        );
    }
    let (decisions, report) = prune_location(
        &args.repo,
        args.endpoint.as_deref(),
        &args.keep.policy(),
        args.dry_run,
        args.wait,
    )?;
    if args.common.json {
        out_json(&report_json(&decisions, &report));
    } else {
        print_text(&decisions, &report);
    }
    Ok(crate::exit::OK)
}

/// Prunes a local directory or an S3 repository; returns what the policy decided and
/// what was done.
pub fn prune_location(
    location: &std::path::Path,
    endpoint: Option<&str>,
    policy: &Policy,
    dry_run: bool,
    wait: bool,
) -> Result<(Vec<Decision>, PruneReport)> {
    match location.to_str() {
        Some(url) if url.starts_with("s3://") => {
            let store = Arc::new(S3Store::open(url, endpoint)?);
            store.check_config()?;
            let _lock = store.lock(LockKind::Prune, wait)?;
            store.remove_stale_locks()?;
            apply(store.clone(), policy, &[], dry_run)
        }
        _ => {
            let store = Arc::new(LocalDir::open_exclusive(location, wait)?);
            // On a standby: the points its replicas hold (or an interrupted apply names)
            // stay, so the next apply writes only changed chunks instead of whole disks.
            let held = replica_points(location)?;
            apply(store, policy, &held, dry_run)
        }
    }
}

/// Restore points a standby's replicas hold or are being brought from/to.
fn replica_points(repo: &std::path::Path) -> Result<Vec<String>> {
    if !replica::state_dir(repo).join("replica.json").exists() {
        return Ok(Vec::new());
    }
    let state = replica::load_state(repo)?;
    let mut ids: Vec<String> = state.replicas.into_iter().filter_map(|r| r.holds).collect();
    if let Some(a) = state.applying {
        ids.push(a.id);
        ids.extend(a.disks.into_iter().filter_map(|d| d.from));
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Prunes by `policy`, also keeping the points `held` names that exist.
fn apply<S: StoreMaintain + 'static>(
    store: Arc<S>,
    policy: &Policy,
    held: &[String],
    dry_run: bool,
) -> Result<(Vec<Decision>, PruneReport)> {
    let repo = Repository::new(Box::new(store.clone()));
    let listing = repo.points()?;
    let points = &listing.0;
    // Pinned ids may be prefixes: resolve them against the listing (the repository is
    // asked only for what the listing cannot settle, so that its message names why).
    let mut policy = policy.clone();
    policy.pinned = policy
        .pinned
        .iter()
        .map(|id| {
            let found: Vec<&str> = points
                .iter()
                .map(|p| p.manifest.id.as_str())
                .filter(|p| p.starts_with(id.as_str()))
                .collect();
            match found.as_slice() {
                [one] => Ok(one.to_string()),
                _ if found.contains(&id.as_str()) => Ok(id.clone()),
                _ => Ok(repo.resolve(id)?.manifest.id),
            }
        })
        .collect::<Result<_>>()?;
    policy.pinned.extend(
        held.iter()
            .filter(|id| points.iter().any(|p| p.manifest.id == **id))
            .cloned(),
    );
    let now = time::OffsetDateTime::now_utc();
    let decisions = prune::decide(points, &policy, now.unix_timestamp());
    let remove: HashSet<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.clone())
        .collect();
    let stamp = now.format(&time::format_description::well_known::Rfc3339)?;
    let report = prune::prune(&repo, store.as_ref(), &listing, &remove, dry_run, &stamp)?;
    Ok((decisions, report))
}

pub fn report_json(decisions: &[Decision], r: &PruneReport) -> serde_json::Value {
    json!({
        "dry_run": r.dry_run,
        "kept": decisions.iter().filter(|d| d.keep)
            .map(|d| json!({"id": d.id, "created": d.created, "reasons": d.reasons}))
            .collect::<Vec<_>>(),
        "removed": decisions.iter().filter(|d| !d.keep)
            .map(|d| json!({"id": d.id, "created": d.created}))
            .collect::<Vec<_>>(),
        "prune_records_written": r.records_written,
        "prune_records_removed": r.records_removed,
        "indexes_removed": r.indexes_removed,
        "chunks_removed": r.chunks_removed,
        "bytes_freed": r.bytes_freed,
        "chunks_kept": r.chunks_kept,
        "bytes_kept": r.bytes_kept,
    })
}

fn print_text(decisions: &[Decision], r: &PruneReport) {
    for d in decisions {
        if d.keep {
            out(&format!("keep    {}  {}", d.id, d.reasons.join(", ")));
        } else {
            out(&format!("remove  {}", d.id));
        }
    }
    out(&summary(r));
}

pub fn summary(r: &PruneReport) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "{} {} restore point(s), {} chunk(s) ({:.1} MiB) and {} index(es); kept {} point(s), \
         {} chunk(s) ({:.1} MiB)",
        if r.dry_run { "would remove" } else { "removed" },
        r.removed.len(),
        r.chunks_removed,
        mib(r.bytes_freed),
        r.indexes_removed,
        r.kept.len(),
        r.chunks_kept,
        mib(r.bytes_kept),
    )
}
