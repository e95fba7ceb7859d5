//! `bkimg replicate --continuous --every DURATION SOURCE...`: capture an incremental of
//! the sources every DURATION and ship it, for as long as the service runs.
//!
//! The loop is `bkimg_replicate::continuous` (captures in this process, live when the
//! bksnap module is loaded; ships; backoff; retention); this file turns its options into
//! the library's and its events into log lines and JSON. The lag printed after each cycle
//! is the age of the newest restore point the target holds (the recovery point objective
//! met at that moment).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bkimg_capture::live::LiveOptions;
use bkimg_format::prune::PruneReport;
use bkimg_format::repo::Repository;
use bkimg_replicate::continuous::{
    self, CaptureSummary, Event, LocalCapture, Outcome, Point, Retain, Schedule, Ship,
};
use bkimg_replicate::ShipReport;
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
    /// As `capture --verify-cbt-every` [default: `verify-cbt-every` in the config file,
    /// else 0: never].
    #[arg(long, value_name = "N", requires = "continuous")]
    pub verify_cbt_every: Option<u32>,
    /// The config file's `threads`, for the captures.
    #[arg(skip)]
    pub capture_threads: Option<usize>,
}

impl ContinuousArgs {
    /// The config file's retention rules and threads; refuses what only continuous mode
    /// takes when it is off.
    pub fn settle(&mut self, config: &crate::config::Config) -> Result<()> {
        if !self.continuous {
            if !self.sources.is_empty() || self.every.is_some() {
                bail!(
                    "SOURCEs and --every go with --continuous (plain replicate ships what --repo holds)"
                );
            }
            if !self.keep.is_empty() {
                bail!(
                    "--keep-* rules go with --continuous; to prune now, run `bkimg prune --repo DIR` \
                     (and `bkimg prune --repo s3://...` for the target) with the same rules"
                );
            }
            return Ok(());
        }
        self.keep.settle(&config.retention);
        self.capture_threads = config.threads(None);
        self.verify_cbt_every = Some(config.verify_cbt_every(self.verify_cbt_every));
        Ok(())
    }
}

/// Captures `c.sources` every `c.every` and ships each point as `args` says.
pub fn run(args: &ReplicateArgs, c: &ContinuousArgs) -> Result<i32> {
    let every = c.every.context("--continuous needs --every DURATION")?;
    if c.sources.is_empty() {
        bail!("--continuous needs the SOURCEs to capture each cycle (block devices or images)");
    }
    let (stop, abort) = stop_on_signals()?;
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
    // Unlocked once, before the first cycle (every later unlock reuses it).
    let repo = args.repo.path();
    args.unlock
        .refuse_unauthenticated("replicate --continuous")?;
    args.unlock.refuse_new_repository(repo)?;
    let protection = if bkimg_format::store::LocalDir::is_repository(repo) {
        let (store, config) = bkimg_format::store::LocalDir::open_any(repo)?;
        crate::cmd::key::protection(&store, &config, &args.unlock)?
    } else {
        Arc::new(bkimg_format::protect::Protection::none())
    };
    let mut capture = LocalCapture {
        repo: repo.to_path_buf(),
        protection,
        sources: c.sources.clone(),
        live: live.then(|| LiveOptions {
            store: c.store.clone(),
            store_size: c.store_size,
            max_store: c.max_store,
            pre_freeze: None,
            post_freeze: None,
        }),
        workers: crate::workers(c.capture_threads),
        verify_cbt_every: c.verify_cbt_every.unwrap_or(0),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        tool: format!("bkimg {}", env!("CARGO_PKG_VERSION")),
        // What a capture says besides its result is not shown (as a `bkimg capture`
        // child's stderr was not).
        log: Arc::new(|_: &str| {}),
        abort,
    };
    let mut target = Target(args);
    let mut prune = Prune(args, c);
    let schedule = Schedule {
        every,
        cycles: c.cycles,
        prune_every: c.prune_every,
    };
    let outcome = continuous::run(
        &schedule,
        &mut capture,
        &mut target,
        (!c.keep.is_empty()).then_some(&mut prune as &mut dyn Retain),
        newest_point(args.repo.path()),
        &stop,
        &mut |event| show(args, event),
    )?;
    match outcome {
        Outcome::Stopped { cycles } => {
            log(&format!("stopped after {cycles} cycle(s)"));
            Ok(crate::exit::OK)
        }
        Outcome::NotShipped { cycles, error } => {
            log(&format!(
                "stopped after {cycles} cycle(s) with restore points not shipped to {} \
                 ({error:#}): they are in {} and the next run ships them",
                args.to,
                args.repo.path().display()
            ));
            Ok(crate::exit::code_for(&error))
        }
    }
}

/// The target `--to` names, without a progress bar.
struct Target<'a>(&'a ReplicateArgs);

impl Ship for Target<'_> {
    fn ship(&mut self) -> Result<ShipReport> {
        Ok(crate::replicate::ship(self.0, true)?.report)
    }
}

/// The retention rules, applied to the local repository, then to an S3 target (a standby
/// prunes its own repository).
struct Prune<'a>(&'a ReplicateArgs, &'a ContinuousArgs);

impl Retain for Prune<'_> {
    fn prune(&mut self) -> Vec<(PathBuf, Result<PruneReport>)> {
        let (args, c) = (self.0, self.1);
        let policy = c.keep.policy();
        let mut places = vec![args.repo.path().to_path_buf()];
        if args.to.starts_with("s3://") {
            places.push(PathBuf::from(&args.to));
        }
        places
            .into_iter()
            .map(|place| {
                let r = crate::prune::prune_location(
                    &place,
                    &args.s3_settings(),
                    &policy,
                    &args.unlock,
                    false,
                    false,
                );
                (place, r.map(|(_, report)| report))
            })
            .collect()
    }
}

/// An event as today's log lines and, with --json, one object per shipped cycle.
fn show(args: &ReplicateArgs, event: Event) {
    match event {
        Event::Captured { cycle, capture } => log(&format!(
            "cycle {cycle}: captured {} ({})",
            capture.point.id,
            describe(capture)
        )),
        Event::CaptureFailed { cycle, error } => {
            log(&format!("cycle {cycle}: capture failed: {error:#}"))
        }
        Event::Shipped {
            cycle,
            report,
            newest_on_target,
            capture,
        } => report_cycle(args, cycle, report, newest_on_target, capture),
        Event::TargetDown {
            cycle,
            error,
            retry_in,
            lag,
        } => log(&format!(
            "cycle {cycle}: target unreachable ({error:#}); retrying in {}, lag {}",
            humantime::format_duration(retry_in),
            show_lag(lag)
        )),
        Event::Pruned {
            cycle,
            place,
            result,
        } => match result {
            Ok(report) => log(&format!(
                "cycle {cycle}: pruned {}: {}",
                place.display(),
                crate::prune::summary(report)
            )),
            Err(e) => log(&format!(
                "cycle {cycle}: pruning {} failed, trying again later: {e:#}",
                place.display()
            )),
        },
        Event::FinalShip => log("shipping the points captured since the last ship before stopping"),
    }
}

fn show_lag(lag: Option<f64>) -> String {
    lag.map_or("unknown".into(), |l| format!("{l:.1} s"))
}

/// "live, changed-blocks, 1.2 MiB read" for the log line of a capture.
fn describe(capture: &CaptureSummary) -> String {
    let mut modes: Vec<&str> = capture.disks.iter().map(|d| d.mode.as_str()).collect();
    modes.sort_unstable();
    modes.dedup();
    format!(
        "{}{}, {} read",
        if capture.live { "live, " } else { "" },
        modes.join("/"),
        HumanBytes(capture.bytes_read)
    )
}

/// The newest restore point already in the repository, if any.
fn newest_point(repo: &Path) -> Option<Point> {
    let (points, _) = Repository::open(repo).and_then(|r| r.points()).ok()?;
    points.last().map(|p| Point {
        id: p.manifest.id.clone(),
        created: p.manifest.created.clone(),
    })
}

fn report_cycle(
    args: &ReplicateArgs,
    cycle: u64,
    report: &ShipReport,
    newest: Option<&Point>,
    captured: Option<&CaptureSummary>,
) {
    let lag = newest.and_then(Point::age);
    if args.common.json {
        // How each disk was read: what the cycle's JSON reports of the capture.
        let captured = captured.map(|c| {
            json!({
                "id": c.point.id,
                "seconds": c.seconds,
                "bytes_read": c.bytes_read,
                "live": c.live,
                "disks": c.disks,
            })
        });
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

/// SIGINT and SIGTERM end the service after the cycle under way (the first flag); a
/// second one also interrupts a live capture under way, which then commits nothing and
/// releases its snapshot (the second flag).
fn stop_on_signals() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    use nix::sys::signal::{SigSet, Signal};
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| anyhow!("cannot block SIGINT and SIGTERM: {e}"))?;
    let (stop2, abort2) = (stop.clone(), abort.clone());
    std::thread::spawn(move || {
        let mut count = 0;
        while count < 2 {
            if set.wait().is_ok() {
                count += 1;
                let flag = if count == 1 { &stop2 } else { &abort2 };
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    Ok((stop, abort))
}
