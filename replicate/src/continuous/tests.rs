//! The loop with real captures of an image file into a local repository and a fake
//! target that copies nothing but remembers which points it was sent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use bkimg_format::repo::Repository;

use super::*;

/// A target that is down for its first `down` ships, and knows what it holds.
struct FakeTarget {
    repo: PathBuf,
    down: u32,
    held: BTreeSet<String>,
    ships: Vec<Vec<String>>,
}

impl Ship for FakeTarget {
    fn ship(&mut self) -> Result<ShipReport> {
        if self.down > 0 {
            self.down -= 1;
            return Err(
                anyhow::Error::new(RemoteError::Unreachable("connection refused".into()))
                    .context("shipping to the fake target"),
            );
        }
        let (points, _) = Repository::open(&self.repo)?.points()?;
        let sent: Vec<String> = points
            .iter()
            .map(|p| p.manifest.id.clone())
            .filter(|id| !self.held.contains(id))
            .collect();
        self.held.extend(sent.iter().cloned());
        self.ships.push(sent.clone());
        Ok(ShipReport {
            points_sent: sent,
            ..Default::default()
        })
    }
}

/// Sets `stop` the moment a capture returns, before the cycle could ship.
struct StopAfterCapture<'a> {
    inner: LocalCapture,
    stop: &'a AtomicBool,
}

impl Capture for StopAfterCapture<'_> {
    fn capture(&mut self, has_parent: bool) -> Result<CaptureSummary> {
        let r = self.inner.capture(has_parent);
        self.stop.store(true, Ordering::SeqCst);
        r
    }
}

struct Failing(u32);

impl Capture for Failing {
    fn capture(&mut self, _: bool) -> Result<CaptureSummary> {
        self.0 += 1;
        Err(anyhow!("cannot read /dev/gone (attempt {})", self.0))
    }
}

fn setup() -> (tempfile::TempDir, LocalCapture, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, data).unwrap();
    let repo = dir.path().join("repo");
    let capture = LocalCapture {
        repo: repo.clone(),
        sources: vec![image],
        live: None,
        workers: 2,
        verify_cbt_every: 0,
        host: "test".into(),
        tool: "test".into(),
        log: Arc::new(|_: &str| {}),
        abort: Arc::new(AtomicBool::new(false)),
        protection: Arc::new(bkimg_format::protect::Protection::none()),
    };
    (dir, capture, repo)
}

fn target(repo: &Path, down: u32) -> FakeTarget {
    FakeTarget {
        repo: repo.to_path_buf(),
        down,
        held: BTreeSet::new(),
        ships: Vec::new(),
    }
}

fn schedule(cycles: u64) -> Schedule {
    Schedule {
        // Short: point ids have one-second resolution but a random part too.
        every: Duration::from_millis(10),
        cycles: Some(cycles),
        prune_every: Duration::from_secs(3600),
    }
}

fn local_points(repo: &Path) -> Vec<String> {
    Repository::open(repo)
        .unwrap()
        .points()
        .unwrap()
        .0
        .iter()
        .map(|p| p.manifest.id.clone())
        .collect()
}

#[test]
fn a_target_down_for_some_cycles_gets_every_point_when_back() {
    let (_dir, mut capture, repo) = setup();
    let mut target = target(&repo, 2);
    let stop = AtomicBool::new(false);
    let mut downs = 0;
    let mut captured = 0;
    let outcome = run(
        &Schedule {
            // Longer than the first backoffs would allow otherwise: each cycle retries.
            every: Duration::from_millis(10),
            cycles: Some(4),
            prune_every: Duration::from_secs(3600),
        },
        &mut capture,
        &mut target,
        None,
        None,
        &stop,
        &mut |e| match e {
            Event::TargetDown { retry_in, .. } => {
                assert!(retry_in <= Duration::from_millis(20), "{retry_in:?}");
                downs += 1
            }
            Event::Captured { .. } => captured += 1,
            _ => {}
        },
    )
    .unwrap();
    assert!(matches!(outcome, Outcome::Stopped { cycles: 4 }));
    assert_eq!((downs, captured), (2, 4));
    let local = local_points(&repo);
    assert_eq!(local.len(), 4);
    // The backoff (10 ms, then 20 ms) may skip a cycle's ship; the first ship after the
    // target is back carries every point captured while it was down.
    let first = &target.ships[0];
    assert!(first.len() >= 3, "{:?}", target.ships);
    assert_eq!(target.held, local.into_iter().collect());
}

#[test]
fn a_stop_between_capture_and_ship_ships_the_point() {
    let (_dir, inner, repo) = setup();
    let stop = AtomicBool::new(false);
    let mut capture = StopAfterCapture { inner, stop: &stop };
    let mut target = target(&repo, 0);
    let mut events = Vec::new();
    let outcome = run(
        &schedule(10),
        &mut capture,
        &mut target,
        None,
        None,
        &stop,
        &mut |e| {
            events.push(match e {
                Event::Captured { .. } => "captured",
                Event::FinalShip => "final ship",
                Event::Shipped { .. } => "shipped",
                _ => "other",
            })
        },
    )
    .unwrap();
    assert!(matches!(outcome, Outcome::Stopped { cycles: 1 }));
    assert_eq!(events, ["captured", "final ship", "shipped"]);
    assert_eq!(target.ships.len(), 1);
    assert_eq!(target.held, local_points(&repo).into_iter().collect());
}

#[test]
fn a_final_ship_that_fails_says_so() {
    let (_dir, inner, repo) = setup();
    let stop = AtomicBool::new(false);
    let mut capture = StopAfterCapture { inner, stop: &stop };
    let mut target = target(&repo, 1);
    let outcome = run(
        &schedule(10),
        &mut capture,
        &mut target,
        None,
        None,
        &stop,
        &mut |_| {},
    )
    .unwrap();
    match outcome {
        Outcome::NotShipped { cycles, error } => {
            assert_eq!(cycles, 1);
            assert!(retryable(&error), "{error:#}");
        }
        Outcome::Stopped { .. } => panic!("the final ship cannot have worked"),
    }
    assert!(target.ships.is_empty());
}

#[test]
fn three_failed_captures_stop_the_loop() {
    let (_dir, _, repo) = setup();
    let mut capture = Failing(0);
    // Down: the ships after failed captures are retried, not fatal.
    let mut target = target(&repo, 10);
    let stop = AtomicBool::new(false);
    let mut failures = 0;
    let err = match run(
        &schedule(10),
        &mut capture,
        &mut target,
        None,
        None,
        &stop,
        &mut |e| {
            if let Event::CaptureFailed { .. } = e {
                failures += 1
            }
        },
    ) {
        Err(e) => e,
        Ok(_) => panic!("the loop went on"),
    };
    assert_eq!(failures, MAX_CAPTURE_FAILURES);
    assert_eq!(capture.0, MAX_CAPTURE_FAILURES);
    assert!(err.is::<CapturesFailed>(), "{err:#}");
    assert!(
        format!("{err:#}").starts_with("3 captures in a row failed: stopping: cannot read"),
        "{err:#}"
    );
}

#[test]
fn a_target_that_refuses_ends_the_loop() {
    struct Denied;
    impl Ship for Denied {
        fn ship(&mut self) -> Result<ShipReport> {
            Err(RemoteError::Denied("access denied".into()).into())
        }
    }
    let (_dir, mut capture, _) = setup();
    let stop = AtomicBool::new(false);
    let r = run(
        &schedule(5),
        &mut capture,
        &mut Denied,
        None,
        None,
        &stop,
        &mut |_| {},
    );
    assert!(matches!(
        r.err().and_then(|e| e.downcast::<RemoteError>().ok()),
        Some(RemoteError::Denied(_))
    ));
}

#[test]
fn busy_targets_are_retried() {
    let busy = anyhow::Error::new(FormatError::Busy("a prune holds it".into()));
    assert!(retryable(&busy));
    assert!(!retryable(&anyhow!("bad bucket name")));
}
