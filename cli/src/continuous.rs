//! `bkimg replicate --continuous --every DURATION SOURCE...`: capture an incremental of
//! the sources every DURATION and ship it, for as long as the service runs.
//!
//! Each cycle runs `bkimg capture` as a child process (live, with changed-block tracking,
//! when the bksnap module is loaded; hash-diff against the latest restore point
//! otherwise), then ships what the target lacks. The lag printed after each cycle is the
//! age of the newest restore point the target holds (the recovery point objective met at
//! that moment). A target that cannot be reached is retried with a growing pause while
//! captures go on on schedule; the next successful ship catches up with all of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::repo::Repository;
use bkimg_replicate::RemoteError;
use clap::Args;
use indicatif::HumanBytes;
use serde_json::json;

use crate::replicate::ReplicateArgs;

#[derive(Args)]
pub struct ContinuousArgs {
    /// Capture and ship repeatedly (a long-running service) instead of shipping once.
    #[arg(long, requires = "every")]
    pub continuous: bool,
    /// Time between captures, e.g. 30s, 5m, 1h 30m (with --continuous).
    #[arg(long, value_name = "DURATION", value_parser = crate::units::duration)]
    pub every: Option<Duration>,
    /// Stop after this many cycles (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    pub cycles: Option<u64>,
    /// Sources to capture each cycle (block devices or image files), as for `capture`.
    pub sources: Vec<PathBuf>,
    /// Difference store of each live capture (bksnap loaded), as `capture --store`:
    /// created and removed by every capture [default: /var/tmp/bkimg-live-PID.store].
    #[arg(long, value_name = "FILE", requires = "continuous")]
    pub store: Option<PathBuf>,
    /// As `capture --store-size` [default: 1G].
    #[arg(long, value_name = "SIZE", requires = "continuous", value_parser = crate::units::size)]
    pub store_size: Option<u64>,
    /// As `capture --max-store` [default: 4 x --store-size].
    #[arg(long, value_name = "SIZE", requires = "continuous", value_parser = crate::units::size)]
    pub max_store: Option<u64>,
    /// Retention (with --continuous): after a ship, prune the local repository and an
    /// s3:// target with these --keep-* rules (a standby prunes its own repository).
    #[command(flatten)]
    pub keep: crate::prune::KeepArgs,
    /// Time between prunes when --keep-* rules are given.
    #[arg(long, value_name = "DURATION", value_parser = crate::units::duration, default_value = "1h")]
    pub prune_every: Duration,
}

/// Longest pause between attempts to reach a target that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Consecutive failed captures after which the service gives up (the source is gone).
const MAX_CAPTURE_FAILURES: u32 = 3;

pub fn run(args: &ReplicateArgs) -> Result<i32> {
    let c = &args.continuous;
    let every = c.every.context("--continuous needs --every DURATION")?;
    if c.sources.is_empty() {
        bail!("--continuous needs the SOURCEs to capture each cycle (block devices or images)");
    }
    let stop = stop_on_signals()?;
    let exe = std::env::current_exe().context("finding the bkimg executable")?;
    let live = Path::new("/dev/bksnap").exists();
    log(&format!(
        "replicating {} to {} every {} ({})",
        c.sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        args.to,
        humantime::format_duration(every),
        if live {
            "live captures with changed-block tracking"
        } else {
            "hash-diff captures: the bksnap module is not loaded"
        }
    ));
    if !live && (c.store.is_some() || c.store_size.is_some() || c.max_store.is_some()) {
        log("--store, --store-size and --max-store are ignored: the captures are not live");
    }

    let mut cycle = 0u64;
    let mut capture_failures = 0u32;
    let mut backoff = Duration::ZERO;
    let mut next_ship = Instant::now();
    // The newest local point (read once; then from each capture's report) and the newest
    // the target is known to hold: the repository is not re-read every cycle.
    let mut newest = newest_point(args.repo.path());
    let mut shipped: Option<Captured> = None;
    let mut last_prune: Option<Instant> = None;
    // Whether a point was captured since the last successful ship: a stop ships it first.
    let mut unshipped = false;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        cycle += 1;
        let mut captured = None;
        match capture(&exe, args, live, newest.is_some()) {
            Ok((point, summary)) => {
                capture_failures = 0;
                log(&format!(
                    "cycle {cycle}: captured {} ({})",
                    point.id,
                    describe(&summary)
                ));
                newest = Some(point);
                captured = Some(summary);
                unshipped = true;
            }
            Err(e) => {
                capture_failures += 1;
                log(&format!("cycle {cycle}: capture failed: {e:#}"));
                if capture_failures >= MAX_CAPTURE_FAILURES {
                    return Err(e.context(format!(
                        "{MAX_CAPTURE_FAILURES} captures in a row failed: stopping"
                    )));
                }
            }
        }
        if Instant::now() >= next_ship && !stop.load(Ordering::SeqCst) {
            match crate::replicate::ship(args, true) {
                Ok(done) => {
                    backoff = Duration::ZERO;
                    // A ship sends every local point: the target now holds the newest.
                    shipped = newest.clone();
                    unshipped = false;
                    report_cycle(
                        args,
                        cycle,
                        &done.report,
                        shipped.as_ref(),
                        captured.as_ref(),
                    );
                    if !c.keep.is_empty() && last_prune.is_none_or(|t| t.elapsed() >= c.prune_every)
                    {
                        last_prune = Some(Instant::now());
                        prune_both(args, cycle);
                    }
                }
                Err(e) => {
                    // A target that is down, or busy with a prune, is tried again later.
                    let unreachable =
                        matches!(crate::exit::remote(&e), Some(RemoteError::Unreachable(_)))
                            || crate::exit::code_for(&e) == crate::exit::BUSY;
                    if !unreachable {
                        return Err(e);
                    }
                    // From --every, doubling, up to MAX_BACKOFF (or --every when longer).
                    backoff = backoff
                        .saturating_mul(2)
                        .max(every)
                        .min(MAX_BACKOFF.max(every));
                    next_ship = Instant::now() + backoff;
                    log(&format!(
                        "cycle {cycle}: target unreachable ({e:#}); retrying in {}, lag {}",
                        humantime::format_duration(backoff),
                        show_lag(shipped.as_ref().and_then(Captured::age))
                    ));
                }
            }
        }
        if c.cycles.is_some_and(|n| cycle >= n) {
            break;
        }
        // Sleep out the rest of the interval, waking for a signal.
        while !stop.load(Ordering::SeqCst) && started.elapsed() < every {
            std::thread::sleep(Duration::from_millis(50).min(every));
        }
    }
    // A stop (or the last of --cycles) may come between a capture and its ship, or while
    // the target is down: one more attempt, so that what was captured is not left behind
    // on this machine alone without a word.
    if unshipped {
        log("shipping the points captured since the last ship before stopping");
        match crate::replicate::ship(args, true) {
            Ok(done) => {
                report_cycle(args, cycle, &done.report, newest.as_ref(), None);
            }
            Err(e) => {
                log(&format!(
                    "stopped after {cycle} cycle(s) with restore points not shipped to {} \
                     ({e:#}): they are in {} and the next run ships them",
                    args.to,
                    args.repo.path().display()
                ));
                return Ok(crate::exit::code_for(&e));
            }
        }
    }
    log(&format!("stopped after {cycle} cycle(s)"));
    Ok(crate::exit::OK)
}

/// Applies the retention rules to the local repository, then to an S3 target. A prune
/// that cannot run now (the repository is busy, the target is down) is logged and tried
/// again at the next prune time: nothing depends on it.
fn prune_both(args: &ReplicateArgs, cycle: u64) {
    let policy = args.continuous.keep.policy();
    let mut places = vec![args.repo.path().to_path_buf()];
    if args.to.starts_with("s3://") {
        places.push(PathBuf::from(&args.to));
    }
    for place in places {
        match crate::prune::prune_location(&place, &args.s3_settings(), &policy, false, false) {
            Ok((_, report)) => log(&format!(
                "cycle {cycle}: pruned {}: {}",
                place.display(),
                crate::prune::summary(&report)
            )),
            Err(e) => log(&format!(
                "cycle {cycle}: pruning {} failed, trying again later: {e:#}",
                place.display()
            )),
        }
    }
}

/// A restore point as continuous mode keeps track of it.
#[derive(Clone)]
struct Captured {
    id: String,
    /// RFC 3339, as in the manifest.
    created: String,
}

impl Captured {
    /// Seconds since the point was captured.
    fn age(&self) -> Option<f64> {
        let t = time::OffsetDateTime::parse(
            &self.created,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        Some((time::OffsetDateTime::now_utc() - t).as_seconds_f64())
    }
}

fn show_lag(lag: Option<f64>) -> String {
    lag.map_or("unknown".into(), |l| format!("{l:.1} s"))
}

/// One capture of every source as a child `bkimg capture` (an incremental of the latest
/// point when there is one); returns the new point and what the capture did.
fn capture(
    exe: &Path,
    args: &ReplicateArgs,
    live: bool,
    has_parent: bool,
) -> Result<(Captured, serde_json::Value)> {
    let mut cmd = Command::new(exe);
    cmd.arg("capture")
        .arg("--repo")
        .arg(args.repo.path())
        .args(["--json", "--quiet"]);
    // The same config file (threads) as this process, however it was named.
    if let Some(file) = &args.config_file {
        cmd.arg("--config").arg(file);
    }
    if has_parent {
        cmd.args(["--parent", "latest"]);
    }
    if live {
        cmd.arg("--live");
        let c = &args.continuous;
        if let Some(store) = &c.store {
            cmd.arg("--store").arg(store);
        }
        for (flag, value) in [("--store-size", c.store_size), ("--max-store", c.max_store)] {
            if let Some(v) = value {
                cmd.args([flag, &v.to_string()]);
            }
        }
    }
    cmd.args(&args.continuous.sources);
    let out = cmd
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running bkimg capture")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(anyhow!(
            "bkimg capture exited with {}: {}",
            out.status.code().unwrap_or(-1),
            err.trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading bkimg capture's JSON")?;
    let field = |name: &str| {
        v[name]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("bkimg capture printed no {name}"))
    };
    let point = Captured {
        id: field("id")?,
        created: field("created")?,
    };
    // How each disk was read: what the cycle's JSON reports of the capture.
    let summary = json!({
        "id": point.id,
        "seconds": v["seconds"],
        "bytes_read": v["bytes_read"],
        "live": !v["live"].is_null(),
        "disks": v["disks"],
    });
    Ok((point, summary))
}

/// "live, changed-blocks, 1.2 MiB read" for the log line of a capture.
fn describe(summary: &serde_json::Value) -> String {
    let mut modes: Vec<&str> = summary["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["mode"].as_str())
        .collect();
    modes.sort_unstable();
    modes.dedup();
    format!(
        "{}{}, {} read",
        if summary["live"] == true {
            "live, "
        } else {
            ""
        },
        modes.join("/"),
        HumanBytes(summary["bytes_read"].as_u64().unwrap_or(0))
    )
}

/// The newest restore point already in the repository, if any.
fn newest_point(repo: &Path) -> Option<Captured> {
    let (points, _) = Repository::open(repo).and_then(|r| r.points()).ok()?;
    points.last().map(|p| Captured {
        id: p.manifest.id.clone(),
        created: p.manifest.created.clone(),
    })
}

fn report_cycle(
    args: &ReplicateArgs,
    cycle: u64,
    report: &bkimg_replicate::ShipReport,
    newest: Option<&Captured>,
    captured: Option<&serde_json::Value>,
) {
    let lag = newest.and_then(Captured::age);
    if args.common.json {
        let v = json!({
            "cycle": cycle,
            "target": args.to,
            "newest_on_target": newest.map(|p| &p.id),
            "lag_seconds": lag,
            "points_sent": report.points_sent,
            "chunks_sent": report.chunks_sent,
            "bytes_sent": report.bytes_sent,
            "ship_seconds": report.seconds,
            "capture": captured,
        });
        crate::out(&v.to_string());
    } else {
        eprintln!(
            "bkimg: cycle {cycle}: shipped {} point(s), {} chunks, {} in {:.1} s; lag {}",
            report.points_sent.len(),
            report.chunks_sent,
            HumanBytes(report.bytes_sent),
            report.seconds,
            show_lag(lag)
        );
    }
}

/// A line for people, on stderr (with --json, stdout carries one object per cycle).
fn log(text: &str) {
    eprintln!("bkimg: {text}");
}

/// SIGINT and SIGTERM end the service after the cycle under way (a capture in progress is
/// interrupted by the same signal and commits nothing).
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use nix::sys::signal::{SigSet, Signal};
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| anyhow!("cannot block SIGINT and SIGTERM: {e}"))?;
    let flag = stop.clone();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    Ok(stop)
}
