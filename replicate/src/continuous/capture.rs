//! The capture of each cycle, in this process: `bkimg_capture`, live when the bksnap
//! module is loaded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bkimg_capture::live::{LiveOptions, Log, Session, SnapshotControl};
use bkimg_capture::{CaptureOptions, Silent};
use bkimg_format::keys::Mode;
use bkimg_format::protect::Protection;
use bkimg_format::repo::Repository;
use bkimg_format::store::{LocalDir, Protected};

use super::{Capture, CaptureSummary, Point};

/// Captures `sources` into the local repository `repo`, as `bkimg capture` does with its
/// defaults (chunk size, compression level, filesystem-aware reads).
pub struct LocalCapture {
    pub repo: PathBuf,
    pub sources: Vec<PathBuf>,
    /// Live captures (the bksnap module is loaded), with these options.
    pub live: Option<LiveOptions>,
    pub workers: usize,
    /// As `CaptureOptions::verify_cbt_every`.
    pub verify_cbt_every: u32,
    pub host: String,
    pub tool: String,
    /// What a live session says besides progress (store growth, warnings).
    pub log: Log,
    /// Set to interrupt a live capture under way: its snapshot is released and nothing is
    /// committed. (A stop of the loop lets the capture under way finish.)
    pub abort: Arc<AtomicBool>,
    /// The repository's protection, unlocked once before the first cycle (none for an
    /// unprotected repository).
    pub protection: Arc<Protection>,
}

impl Capture for LocalCapture {
    fn capture(&mut self, has_parent: bool) -> Result<CaptureSummary> {
        let started = Instant::now();
        let (id, created) = bkimg_capture::new_point_id()?;
        let (store, config) =
            LocalDir::open_or_create_any(&self.repo, &uuid::Uuid::new_v4().to_string(), &created)?;
        let mode = config.encryption.as_ref().map_or(Mode::None, |e| e.mode);
        if mode != self.protection.mode() {
            bail!(
                "{} changed its protection since replication started (now {mode:?}): restart \
                 the replication",
                self.repo.display()
            );
        }
        let store = Protected::new(store, self.protection.clone());
        let reader = Repository::new(Box::new(Protected::new(
            LocalDir::open_any(&self.repo)?.0,
            self.protection.clone(),
        )));
        let parent = match has_parent {
            true => Some(
                reader
                    .resolve("latest")
                    .context("the --parent restore point")?,
            ),
            false => None,
        };
        let mut opts = CaptureOptions {
            sources: self.sources.clone(),
            source_names: Vec::new(),
            changed_blocks: Vec::new(),
            chunk_size: bkimg_format::DEFAULT_CHUNK_SIZE,
            level: bkimg_capture::DEFAULT_LEVEL,
            raw: false,
            workers: self.workers,
            id,
            created,
            host: self.host.clone(),
            tool: self.tool.clone(),
            consistency: if self.live.is_some() {
                bkimg_capture::claim::Consistency::FrozenSnapshot
            } else {
                bkimg_capture::claim::Consistency::Offline
            },
            verify_cbt_every: self.verify_cbt_every,
        };
        let result = match &self.live {
            None => {
                let _claim = bkimg_capture::claim::claim_offline(&opts.sources)?;
                bkimg_capture::capture(&reader, &store, parent.as_ref(), &opts, &Silent)?
            }
            Some(live) => {
                let mut session = Session::new(
                    live,
                    &opts.sources,
                    || Ok(Arc::new(bkimg_kmod::Control::open()?) as Arc<dyn SnapshotControl>),
                    self.log.clone(),
                )?;
                let interrupter = session.interrupter();
                let finished = AtomicBool::new(false);
                let result = std::thread::scope(|s| {
                    // An abort interrupts the capture as SIGINT interrupts `bkimg capture`.
                    s.spawn(|| {
                        while !finished.load(Ordering::SeqCst) {
                            if self.abort.load(Ordering::SeqCst) {
                                interrupter.interrupt(|_| {}, |_| {});
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    });
                    let r = session
                        .start(&mut opts, parent.as_ref(), &Silent)
                        .and_then(|()| {
                            session.capture(&reader, &store, parent.as_ref(), &opts, &Silent)
                        });
                    finished.store(true, Ordering::SeqCst);
                    r
                });
                session.finish();
                result?
            }
        };
        Ok(CaptureSummary {
            point: Point {
                id: result.manifest.id.clone(),
                created: result.manifest.created.clone(),
            },
            seconds: started.elapsed().as_secs_f64(),
            bytes_read: result.reports.iter().map(|r| r.bytes_read).sum(),
            live: self.live.is_some(),
            disks: result.reports,
        })
    }
}
