//! `bkimg prune`: delete the restore points a retention policy no longer keeps, and the
//! chunks and indexes only they used, in a local repository or an S3 one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use bkimg_format::prune::{self, Decision, Policy, PruneReport};
use bkimg_format::repo::Repository;
use bkimg_format::store::{LocalDir, Protected, StoreMaintain};
use bkimg_replicate::s3::{LockKind, S3Settings, S3Store};
use bkimg_replicate::standby::replica;
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs, RetentionConfig, S3Config};
use crate::{out, out_json, Common};

/// Which restore points to keep; every option adds to the kept set. The newest point of
/// each machine is always kept. A rule left out comes from the config file's [retention]
/// (`keep-last = 10`, ...): a flag replaces that one rule only (`--keep-daily 0` turns the
/// file's off).
#[derive(Args, Clone, Default)]
pub struct KeepArgs {
    /// Keep the newest N restore points.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    /// ... of each of the last N days (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// ... of each of the last N weeks (Monday to Sunday, UTC).
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// ... of each of the last N months (UTC).
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// Keep every point younger than this (e.g. 36h, 7d, 4w, 1d 12h).
    #[arg(long, value_name = "AGE", value_parser = crate::units::duration_or_zero)]
    pub keep_within: Option<Duration>,
    /// Keep this restore point (id or unique prefix; repeat).
    #[arg(long = "keep", value_name = "ID")]
    pub keep_ids: Vec<String>,
}

impl KeepArgs {
    /// Takes each rule the command line left out from the config file.
    pub fn settle(&mut self, file: &RetentionConfig) {
        self.keep_last = self.keep_last.or(file.keep_last);
        self.keep_hourly = self.keep_hourly.or(file.keep_hourly);
        self.keep_daily = self.keep_daily.or(file.keep_daily);
        self.keep_weekly = self.keep_weekly.or(file.keep_weekly);
        self.keep_monthly = self.keep_monthly.or(file.keep_monthly);
        self.keep_within = self.keep_within.or(file.keep_within);
    }

    pub fn policy(&self) -> Policy {
        Policy {
            last: self.keep_last.unwrap_or(0),
            hourly: self.keep_hourly.unwrap_or(0),
            daily: self.keep_daily.unwrap_or(0),
            weekly: self.keep_weekly.unwrap_or(0),
            monthly: self.keep_monthly.unwrap_or(0),
            // Zero keeps nothing: the rule is off.
            within_secs: self
                .keep_within
                .filter(|d| !d.is_zero())
                .map(|d| d.as_secs()),
            pinned: self.keep_ids.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policy().is_empty()
    }
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// S3 endpoint URL (else the AWS chain: AWS_ENDPOINT_URL, profiles..., then the
    /// config file's).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub keep: KeepArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    /// Say what would be deleted and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait for captures, restores and replications using the repository to finish
    /// instead of refusing (exit 10).
    #[arg(long)]
    pub wait: bool,
    /// The config file's [s3] section.
    #[arg(skip)]
    pub s3_config: S3Config,
    #[command(flatten)]
    pub common: Common,
}

impl PruneArgs {
    pub fn settle(&mut self, config: &Config) -> Result<()> {
        self.repo.settle(config)?;
        self.repo.require_local(
            "prune",
            "a standby prunes its own repository: run `bkimg prune --repo DIR` on the \
             standby host, DIR being the directory its `bkimg standby serve --repo` names",
        )?;
        self.keep.settle(&config.retention);
        self.s3_config = config.s3.clone();
        Ok(())
    }
}

pub fn run(args: &PruneArgs) -> Result<i32> {
    if args.keep.is_empty() {
        bail!(
            "say what to keep: --keep-last N, --keep-hourly/--keep-daily/--keep-weekly/\
             --keep-monthly N, --keep-within AGE or --keep ID, or the same rules in the \
             config file's [retention] (add --dry-run to see the outcome first)"
        );
    }
    let (decisions, report) = prune_location(
        args.repo.path(),
        &s3_settings(args.endpoint.as_deref(), &args.s3_config),
        &args.keep.policy(),
        &args.unlock,
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
    s3: &S3Settings,
    policy: &Policy,
    unlock: &crate::cmd::key::Unlock,
    dry_run: bool,
    wait: bool,
) -> Result<(Vec<Decision>, PruneReport)> {
    unlock.refuse_unauthenticated("prune")?;
    match location.to_str() {
        Some(url) if url.starts_with("s3://") => {
            let store = Arc::new(S3Store::open(url, s3)?);
            let config = store.config(true)?;
            let protection =
                crate::cmd::key::protection_with(url, &config, || store.key_slots(), unlock)?;
            let _lock = store.lock(LockKind::Prune, wait)?;
            store.remove_stale_locks()?;
            let protected = Arc::new(Protected::new(store.clone(), protection));
            crate::known::check(
                location,
                &config,
                &Repository::new(Box::new(protected.clone())),
                unlock,
            )?;
            apply(protected, policy, &[], dry_run)
        }
        _ => {
            let (store, config) = LocalDir::open_exclusive_any(location, wait)?;
            let protection = crate::cmd::key::protection(&store, &config, unlock)?;
            let store = Arc::new(Protected::new(store, protection));
            crate::known::check(
                location,
                &config,
                &Repository::new(Box::new(store.clone())),
                unlock,
            )?;
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
    format!(
        "{} {} restore point(s), {} chunk(s) ({}) and {} index(es); kept {} point(s), \
         {} chunk(s) ({})",
        if r.dry_run { "would remove" } else { "removed" },
        r.removed.len(),
        r.chunks_removed,
        HumanBytes(r.bytes_freed),
        r.indexes_removed,
        r.kept.len(),
        r.chunks_kept,
        HumanBytes(r.bytes_kept),
    )
}

/// S3 settings from `--endpoint` and the config file.
pub fn s3_settings(endpoint: Option<&str>, file: &S3Config) -> S3Settings {
    S3Settings {
        endpoint: endpoint.map(str::to_owned),
        fallback_endpoint: file.endpoint.clone(),
        fallback_region: file.region.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_replace_the_file_rule_by_rule() {
        let file =
            Config::parse("[retention]\nkeep-last = 1\nkeep-daily = 7\nkeep-within = \"2d\"\n")
                .unwrap();
        let mut keep = KeepArgs {
            keep_last: Some(3),
            keep_within: Some(Duration::ZERO),
            ..KeepArgs::default()
        };
        keep.settle(&file.retention);
        let p = keep.policy();
        assert_eq!((p.last, p.daily, p.hourly), (3, 7, 0));
        // --keep-within 0 turns the file's rule off.
        assert_eq!(p.within_secs, None);
        let mut none = KeepArgs::default();
        none.settle(&Config::default().retention);
        assert!(none.is_empty());
        let mut from_file = KeepArgs::default();
        from_file.settle(&file.retention);
        assert_eq!(from_file.policy().within_secs, Some(2 * 86_400));
    }
}
