//! `bkimg capture`: disks, partitions or image files into one restore point (live with
//! `--live`: see `crate::live`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bkimg_capture::claim::Consistency;
use bkimg_capture::{CaptureOptions, ChangeSource};
use bkimg_format::store::{LocalDir, Protected};
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::config::{Config, RepoArgs};
use crate::progress::Bar;
use crate::{exit, live, out, out_json, units, workers, Common};

#[derive(Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Block devices or raw image files; several make one restore point of a machine.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Make an incremental of this restore point ("latest" or an id).
    #[arg(long)]
    pub parent: Option<String>,
    /// Change map for the SOURCE at the same position (repeat per source; "-" for none).
    /// When the parent was captured at the tracker state the map starts from, only the
    /// ranges it names are read and the rest comes from the parent; otherwise the source
    /// is read whole (hash-diff). Either way the map's end state is recorded, so the
    /// next incremental can use the next map.
    #[arg(long = "changed-blocks", value_name = "FILE")]
    pub changed_blocks: Vec<String>,
    /// Verify change tracking every N captures: when a disk's change map could be used
    /// and the parent ends a run of N-1 captures that used maps, read the disk whole
    /// instead (hash-diff) and count chunks the map missed (reported as `missed_chunks`
    /// and a warning). 0: never [default: `verify-cbt-every` in the config file, else 0].
    #[arg(long, value_name = "N")]
    pub verify_cbt_every: Option<u32>,
    /// Chunk size, a power of two from 4K to 16M [default: 256K]. Incrementals use the
    /// parent's.
    #[arg(long, value_name = "SIZE", value_parser = units::size)]
    pub chunk_size: Option<u64>,
    /// Chunk size in KiB (before --chunk-size).
    #[arg(long, value_name = "KIB", hide = true, conflicts_with = "chunk_size")]
    pub chunk_kib: Option<u64>,
    /// zstd level (1-19; 0 stores chunks uncompressed).
    #[arg(long, default_value_t = bkimg_capture::DEFAULT_LEVEL)]
    pub level: i32,
    /// Store every byte, ignoring filesystem allocation maps.
    #[arg(long)]
    pub raw: bool,
    /// Hash/compress threads (default: 4 per CPU, or `threads` in the config file).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Capture sources even when they are mounted or in use (without --live): the copy may
    /// be inconsistent, and the restore point says so.
    #[arg(long, conflicts_with = "live")]
    pub allow_inconsistent: bool,
    #[command(flatten)]
    pub live: live::LiveArgs,
    #[command(flatten)]
    pub unlock: crate::cmd::key::Unlock,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: CaptureArgs, config: &Config) -> Result<i32> {
    let CaptureArgs {
        repo,
        sources,
        parent,
        changed_blocks,
        verify_cbt_every,
        chunk_size,
        chunk_kib,
        level,
        raw,
        threads,
        allow_inconsistent,
        live,
        unlock,
        common,
    } = args;
    let repo = repo.path();
    let chunk_size = chunk_kib
        .map(|k| k.saturating_mul(1024))
        .or(chunk_size)
        .map_or(Some(bkimg_format::DEFAULT_CHUNK_SIZE), |c| {
            u32::try_from(c).ok()
        })
        .filter(|c| c.is_power_of_two())
        .filter(|c| (bkimg_format::MIN_CHUNK_SIZE..=bkimg_format::MAX_CHUNK_SIZE).contains(c))
        .context("--chunk-size must be a power of two from 4K to 16M")?;
    if !(0..=19).contains(&level) {
        bail!("--level must be 0 (no compression) to 19");
    }
    if changed_blocks.len() > sources.len() {
        bail!("more --changed-blocks than sources: give one per SOURCE, in order");
    }
    // A source that cannot be read creates no repository.
    for source in &sources {
        std::fs::File::open(source).map_err(|e| {
            anyhow::anyhow!(
                "cannot open source {}: {e}; name a disk, partition or image file that exists \
                 and that this user may read",
                source.display()
            )
        })?;
    }
    // Offline: nothing else may mount, claim or lock a source while it is read.
    let _claim = if live.live || allow_inconsistent {
        None
    } else {
        Some(bkimg_capture::claim::claim_offline(&sources)?)
    };
    let consistency = if live.live {
        Consistency::FrozenSnapshot
    } else if allow_inconsistent {
        Consistency::Inconsistent
    } else {
        Consistency::Offline
    };
    let (id, created) = bkimg_capture::new_point_id()?;
    unlock.refuse_unauthenticated("capture")?;
    unlock.refuse_new_repository(repo)?;
    let (store, repo_config) =
        LocalDir::open_or_create_any(repo, &uuid::Uuid::new_v4().to_string(), &created)?;
    let protection = crate::cmd::key::protection(&store, &repo_config, &unlock)?;
    let store = Protected::new(store, protection.clone());
    let reader = crate::cmd::key::protected_repository(LocalDir::open_any(repo)?.0, protection);
    crate::known::check(repo, &repo_config, &reader, &unlock)?;
    let parent_point = match &parent {
        Some(p) => Some(reader.resolve(p).context("the --parent restore point")?),
        None => None,
    };
    let bar = Bar::new(common.quiet || common.json);
    let started = std::time::Instant::now();
    let mut opts = CaptureOptions {
        sources,
        source_names: Vec::new(),
        changed_blocks: changed_blocks
            .iter()
            .map(|c| (c != "-").then(|| ChangeSource::File(PathBuf::from(c))))
            .collect(),
        chunk_size,
        level,
        raw,
        workers: workers(threads),
        id,
        created,
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        tool: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
        consistency,
        verify_cbt_every: config.verify_cbt_every(verify_cbt_every),
    };
    let session = live::start(&live, &mut opts, parent_point.as_ref(), &bar)?;
    let result = match &session {
        Some(s) => s.capture(&reader, &store, parent_point.as_ref(), &opts, &bar),
        None => bkimg_capture::capture(&reader, &store, parent_point.as_ref(), &opts, &bar),
    };
    bar.finish();
    let live_report = session.map(live::finish);
    let result = result?;
    crate::known::wrote(
        repo,
        &repo_config,
        &result.manifest.id,
        result.manifest.sequence,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let m = &result.manifest;
    let read: u64 = result.reports.iter().map(|r| r.bytes_read).sum();
    let stored: u64 = result.reports.iter().map(|r| r.bytes_stored_new).sum();
    if common.json {
        let mut v = json!({
            "id": m.id,
            "parent": m.parent.as_ref().map(|p| &p.id),
            "created": m.created,
            "seconds": secs,
            "bytes_read": read,
            "bytes_stored_new": stored,
            "disks": result.reports,
        });
        if let Some(l) = live_report {
            v["live"] = l;
        }
        out_json(&v);
    } else {
        for r in &result.reports {
            eprintln!(
                "{}: {} ({}{}), read {}, stored {} new in {} chunks",
                r.disk,
                r.source,
                r.mode,
                r.missed_chunks.map_or(String::new(), |n| format!(
                    ", verifying change tracking: {n} chunk(s) missed"
                )),
                HumanBytes(r.bytes_read),
                HumanBytes(r.bytes_stored_new),
                r.chunks_new
            );
        }
        eprintln!("restore point {} committed in {secs:.1} s", m.id);
        out(&m.id);
    }
    Ok(exit::OK)
}
