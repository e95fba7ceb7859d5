//! Continuous replication: capture the sources every interval and ship what the target
//! lacks, for as long as the service runs.
//!
//! Each cycle captures ([`Capture`]: in-process, live with changed-block tracking when
//! the bksnap module is loaded, hash-diff against the latest point otherwise), then ships
//! ([`Ship`]). A target that cannot be reached (or is busy with a prune) is retried with a
//! growing pause while captures go on on schedule; the next successful ship catches up
//! with all of them. After a ship, retention rules are applied every so often
//! ([`Retain`]). What happens is reported as [`Event`]s; the caller turns them into log
//! lines and JSON.

mod capture;
#[cfg(test)]
mod tests;

pub use capture::LocalCapture;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use bkimg_capture::DiskReport;
use bkimg_format::prune::PruneReport;
use bkimg_format::FormatError;

use crate::{RemoteError, ShipReport};

/// Longest pause between attempts to reach a target that is down.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Consecutive failed captures after which the service gives up (the source is gone).
pub const MAX_CAPTURE_FAILURES: u32 = 3;

/// A restore point as continuous mode keeps track of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub id: String,
    /// RFC 3339, as in the manifest.
    pub created: String,
}

impl Point {
    /// Seconds since the point was captured.
    pub fn age(&self) -> Option<f64> {
        let t = time::OffsetDateTime::parse(
            &self.created,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        Some((time::OffsetDateTime::now_utc() - t).as_seconds_f64())
    }
}

/// What one capture did.
#[derive(Clone, Debug)]
pub struct CaptureSummary {
    pub point: Point,
    pub seconds: f64,
    pub bytes_read: u64,
    /// Read from a live snapshot.
    pub live: bool,
    /// How each disk was read.
    pub disks: Vec<DiskReport>,
}

/// Captures one restore point of the sources.
pub trait Capture {
    /// An incremental of the latest point when `has_parent`.
    fn capture(&mut self, has_parent: bool) -> Result<CaptureSummary>;
}

/// Ships to the target every local restore point it lacks.
pub trait Ship {
    fn ship(&mut self) -> Result<ShipReport>;
}

/// Applies retention rules; each place pruned (the local repository, the target) and how
/// that went. A prune that fails is tried again at the next prune time.
pub trait Retain {
    fn prune(&mut self) -> Vec<(PathBuf, Result<PruneReport>)>;
}

/// When cycles run.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Time between captures.
    pub every: Duration,
    /// Stop after this many cycles (None: until stopped).
    pub cycles: Option<u64>,
    /// Time between prunes.
    pub prune_every: Duration,
}

/// What happened, for the log and the JSON output.
pub enum Event<'a> {
    Captured {
        cycle: u64,
        capture: &'a CaptureSummary,
    },
    CaptureFailed {
        cycle: u64,
        error: &'a anyhow::Error,
    },
    Shipped {
        cycle: u64,
        report: &'a ShipReport,
        /// The newest point the target holds now.
        newest_on_target: Option<&'a Point>,
        /// This cycle's capture, if it made a point.
        capture: Option<&'a CaptureSummary>,
    },
    /// The target is unreachable or busy: the next ship is in `retry_in`.
    TargetDown {
        cycle: u64,
        error: &'a anyhow::Error,
        retry_in: Duration,
        /// Age of the newest point the target is known to hold.
        lag: Option<f64>,
    },
    Pruned {
        cycle: u64,
        place: &'a std::path::Path,
        result: &'a Result<PruneReport>,
    },
    /// Stopping with points captured since the last ship: one more ship.
    FinalShip,
}

/// The error context when [`MAX_CAPTURE_FAILURES`] captures in a row failed: the service
/// gives up (exit code 1 in the CLI, whatever the last capture's error was).
#[derive(Debug, thiserror::Error)]
#[error("{MAX_CAPTURE_FAILURES} captures in a row failed: stopping")]
pub struct CapturesFailed;

/// How the service ended (errors that end it early are the `Err` of [`run`]).
pub enum Outcome {
    Stopped {
        cycles: u64,
    },
    /// The final ship failed: points captured since the last ship are only local.
    NotShipped {
        cycles: u64,
        error: anyhow::Error,
    },
}

/// Whether a failed ship is worth retrying later: the target is unreachable, or busy
/// (a prune holds it).
pub fn retryable(err: &anyhow::Error) -> bool {
    if matches!(crate::remote_error(err), Some(RemoteError::Unreachable(_))) {
        return true;
    }
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<FormatError>() {
            return matches!(f, FormatError::Busy(_));
        }
        if cause.is::<RemoteError>() {
            return false;
        }
    }
    false
}

/// Runs cycles until `stop` is set or `schedule.cycles` are done. `newest` is the newest
/// point already in the local repository. Ends early with an error when the target
/// refuses a ship for a reason that retrying will not fix, or after
/// [`MAX_CAPTURE_FAILURES`] failed captures in a row.
pub fn run(
    schedule: &Schedule,
    capture: &mut dyn Capture,
    target: &mut dyn Ship,
    mut retain: Option<&mut dyn Retain>,
    newest: Option<Point>,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    let every = schedule.every;
    let mut cycle = 0u64;
    let mut capture_failures = 0u32;
    let mut backoff = Duration::ZERO;
    let mut next_ship = Instant::now();
    // The newest local point (then from each capture) and the newest the target is known
    // to hold: the repository is not re-read every cycle.
    let mut newest = newest;
    let mut shipped: Option<Point> = None;
    let mut last_prune: Option<Instant> = None;
    // Whether a point was captured since the last successful ship: a stop ships it first.
    let mut unshipped = false;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        cycle += 1;
        let mut captured = None;
        match capture.capture(newest.is_some()) {
            Ok(summary) => {
                capture_failures = 0;
                observe(Event::Captured {
                    cycle,
                    capture: &summary,
                });
                newest = Some(summary.point.clone());
                captured = Some(summary);
                unshipped = true;
            }
            Err(e) => {
                capture_failures += 1;
                observe(Event::CaptureFailed { cycle, error: &e });
                if capture_failures >= MAX_CAPTURE_FAILURES {
                    return Err(e.context(CapturesFailed));
                }
            }
        }
        if Instant::now() >= next_ship && !stop.load(Ordering::SeqCst) {
            match target.ship() {
                Ok(report) => {
                    backoff = Duration::ZERO;
                    // A ship sends every local point: the target now holds the newest.
                    shipped = newest.clone();
                    unshipped = false;
                    observe(Event::Shipped {
                        cycle,
                        report: &report,
                        newest_on_target: shipped.as_ref(),
                        capture: captured.as_ref(),
                    });
                    if let Some(retain) = retain.as_deref_mut() {
                        if last_prune.is_none_or(|t| t.elapsed() >= schedule.prune_every) {
                            last_prune = Some(Instant::now());
                            for (place, result) in retain.prune() {
                                observe(Event::Pruned {
                                    cycle,
                                    place: &place,
                                    result: &result,
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    if !retryable(&e) {
                        return Err(e);
                    }
                    // From `every`, doubling, up to MAX_BACKOFF (or `every` when longer).
                    backoff = backoff
                        .saturating_mul(2)
                        .max(every)
                        .min(MAX_BACKOFF.max(every));
                    next_ship = Instant::now() + backoff;
                    observe(Event::TargetDown {
                        cycle,
                        error: &e,
                        retry_in: backoff,
                        lag: shipped.as_ref().and_then(Point::age),
                    });
                }
            }
        }
        if schedule.cycles.is_some_and(|n| cycle >= n) {
            break;
        }
        // Sleep out the rest of the interval, waking for a stop.
        while !stop.load(Ordering::SeqCst) && started.elapsed() < every {
            std::thread::sleep(Duration::from_millis(50).min(every));
        }
    }
    // A stop (or the last of the cycles) may come between a capture and its ship, or
    // while the target is down: one more attempt, so that what was captured is not left
    // behind on this machine alone without a word.
    if unshipped {
        observe(Event::FinalShip);
        match target.ship() {
            Ok(report) => observe(Event::Shipped {
                cycle,
                report: &report,
                newest_on_target: newest.as_ref(),
                capture: None,
            }),
            Err(error) => {
                return Ok(Outcome::NotShipped {
                    cycles: cycle,
                    error,
                })
            }
        }
    }
    Ok(Outcome::Stopped { cycles: cycle })
}
