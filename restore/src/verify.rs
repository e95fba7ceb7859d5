//! Verification: every manifest, parent link, index and chunk a restore point needs is
//! read and checked. Problems are collected, not fatal, so one run names all damage.
//!
//! One thread walks the restore points, their indexes and entries in order; a fixed number
//! of workers read and check chunks (reading is latency-bound on object storage: one
//! request per chunk). Each problem keeps its place in the walk, so the report lists them
//! in the same order whatever the number of workers.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use bkimg_format::manifest::Content;
use bkimg_format::progress::Progress;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::{Digest, FormatError};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use serde::Serialize;

/// Digests checked recently; cleared when full so memory stays bounded (a chunk shared by
/// many restore points may then be checked more than once, never less).
const SEEN_LIMIT: usize = 1 << 20;

/// Chunks handed to the workers and not yet settled, per worker.
const IN_FLIGHT_PER_WORKER: usize = 4;

/// References waiting for a chunk that is being checked (the same chunk named again and
/// again, e.g. a volume of one repeated pattern): past this, the walk waits for results.
const WAITING_LIMIT: usize = 1 << 16;

#[derive(Debug, Serialize)]
pub struct Problem {
    pub point: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Byte offset within the volume of the damaged chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
    pub error: String,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub points: Vec<String>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

/// Verifies `ids` (all restore points when empty), reading chunks with `workers` threads.
pub fn verify(
    repo: &Repository,
    ids: &[String],
    workers: usize,
    progress: &dyn Progress,
) -> anyhow::Result<VerifyReport> {
    let mut problems = Vec::new();
    let mut points = Vec::new();
    if ids.is_empty() {
        let (good, bad) = repo.points()?;
        for (id, e) in bad {
            problems.push(problem(&id, None, None, None, None, e.full_message()));
        }
        points = good;
    } else {
        for id in ids {
            match repo.resolve(id) {
                Ok(p) => points.push(p),
                Err(e @ FormatError::Missing { .. }) => return Err(e.into()),
                Err(e) => problems.push(problem(id, None, None, None, None, e.full_message())),
            }
        }
    }
    let total: u64 = points
        .iter()
        .flat_map(|p| p.manifest.disks.iter().flat_map(|d| &d.volumes))
        .map(|v| v.size)
        .sum();
    progress.begin("verify", total);

    let workers = workers.max(1);
    let (jobs_tx, jobs_rx) = bounded::<Digest>(workers * IN_FLIGHT_PER_WORKER);
    let (results_tx, results_rx) = unbounded();
    let report = std::thread::scope(|s| {
        for _ in 0..workers {
            let (jobs, results) = (jobs_rx.clone(), results_tx.clone());
            s.spawn(move || check_chunks(repo, jobs, results));
        }
        drop((jobs_rx, results_tx));
        let mut walk = Walk {
            repo,
            progress,
            jobs: Some(jobs_tx),
            results: results_rx,
            max_in_flight: workers * IN_FLIGHT_PER_WORKER,
            waiting: HashMap::new(),
            waiting_refs: 0,
            seen: HashSet::new(),
            places: Vec::new(),
            problems: problems.into_iter().map(|p| (0, p)).collect(),
            order: 0,
            report: VerifyReport::default(),
        };
        for point in &points {
            walk.report.points.push(point.manifest.id.clone());
            walk.point(point);
        }
        walk.finish()
    });
    Ok(report)
}

/// What a worker found: the chunk's length once decoded and checked, or why it is bad.
type Checked = (Digest, Result<usize, String>);

/// A worker: reads, decodes and checks the SHA-256 of each chunk it is given.
fn check_chunks(repo: &Repository, jobs: Receiver<Digest>, results: Sender<Checked>) {
    let (mut blob, mut plain) = (Vec::new(), Vec::new());
    for d in jobs {
        // A panic is a bug, but the walk waits for every chunk it handed out: answer anyway.
        let checked = catch_unwind(AssertUnwindSafe(|| {
            repo.chunk(&d, &mut blob, &mut plain)
                .map(|()| plain.len())
                .map_err(|e| e.full_message())
        }))
        .unwrap_or_else(|_| {
            Err(format!(
                "chunk {d} could not be checked: bkimg panicked reading it (a bug; please report it)"
            ))
        });
        if results.send((d, checked)).is_err() {
            return;
        }
    }
}

/// Where a volume is: the names a problem in it carries.
struct Place {
    point: String,
    disk: String,
    volume: String,
}

/// One index entry naming a chunk that is being checked.
struct Ref {
    /// Position in the walk, for the order of the report.
    order: u64,
    place: usize,
    offset: u64,
    len: u64,
}

struct Walk<'a> {
    repo: &'a Repository,
    progress: &'a dyn Progress,
    jobs: Option<Sender<Digest>>,
    results: Receiver<Checked>,
    max_in_flight: usize,
    /// Chunks handed to the workers, with every entry that named them since.
    waiting: HashMap<Digest, Vec<Ref>>,
    waiting_refs: usize,
    /// Chunks found good (damaged ones are read again for each entry naming them, as a
    /// sequential walk would).
    seen: HashSet<Digest>,
    places: Vec<Place>,
    problems: Vec<(u64, Problem)>,
    order: u64,
    report: VerifyReport,
}

impl Walk<'_> {
    fn next_order(&mut self) -> u64 {
        self.order += 1;
        self.order
    }

    fn push(&mut self, p: Problem) {
        let order = self.next_order();
        self.problems.push((order, p));
    }

    fn point(&mut self, point: &Point) {
        let id = &point.manifest.id;
        if let Err(e) = self.repo.ancestors(point) {
            self.push(problem(id, None, None, None, None, e.full_message()));
        }
        let mut batch = Vec::new();
        for (disk, volume, index) in point.manifest.indexes() {
            let at = |e: &FormatError| {
                problem(
                    id,
                    Some(&disk.name),
                    Some(&volume.name),
                    None,
                    None,
                    e.full_message(),
                )
            };
            let Content::Data {
                index: index_hex, ..
            } = &volume.content
            else {
                self.progress.advance(volume.size);
                continue;
            };
            let Some(index) = index else {
                let e = FormatError::corrupt("manifest", format!("bad index id {index_hex:?}"));
                self.push(at(&e));
                continue;
            };
            let mut entries = match self.repo.index(&index) {
                Ok(r) => r,
                Err(e) => {
                    self.push(at(&e));
                    self.progress.advance(volume.size);
                    continue;
                }
            };
            let h = *entries.header();
            if h.volume_size != volume.size || h.chunk_size != point.manifest.chunk_size {
                let e = FormatError::corrupt(
                    format!("volume index {index}"),
                    "its size or chunk size differs from the manifest",
                );
                self.push(at(&e));
            }
            let place = self.places.len();
            self.places.push(Place {
                point: id.clone(),
                disk: disk.name.clone(),
                volume: volume.name.clone(),
            });
            let mut entry = 0u64;
            loop {
                if let Err(e) = entries.next_batch(4096, &mut batch) {
                    self.push(at(&e));
                    break;
                }
                if batch.is_empty() {
                    break;
                }
                for d in &batch {
                    let offset = entry * u64::from(h.chunk_size);
                    let len = u64::from(h.chunk_len(entry.min(h.entry_count() - 1)));
                    entry += 1;
                    if d.is_hole() || self.seen.contains(d) {
                        self.progress.advance(len);
                        continue;
                    }
                    let r = Ref {
                        order: self.next_order(),
                        place,
                        offset,
                        len,
                    };
                    self.check(d, r);
                }
            }
        }
    }

    /// Has chunk `d` checked for entry `r`, or adds `r` to a check under way.
    fn check(&mut self, d: &Digest, r: Ref) {
        if let Some(refs) = self.waiting.get_mut(d) {
            refs.push(r);
            self.waiting_refs += 1;
            while self.waiting_refs > WAITING_LIMIT {
                self.settle_one();
            }
            return;
        }
        while self.waiting.len() >= self.max_in_flight {
            self.settle_one();
        }
        self.waiting.insert(*d, vec![r]);
        self.waiting_refs += 1;
        let jobs = self
            .jobs
            .as_ref()
            .expect("jobs are handed out until finish");
        jobs.send(*d).expect("workers run until the walk ends");
        // Take what is ready, so that chunks found good are skipped from now on.
        while let Ok((d, checked)) = self.results.try_recv() {
            self.settle(d, checked);
        }
    }

    fn settle_one(&mut self) {
        let (d, checked) = self
            .results
            .recv()
            .expect("workers answer every chunk they are given");
        self.settle(d, checked);
    }

    /// Applies a worker's finding to every entry that named the chunk.
    fn settle(&mut self, d: Digest, checked: Result<usize, String>) {
        let refs = self
            .waiting
            .remove(&d)
            .expect("only chunks handed out come back");
        self.waiting_refs -= refs.len();
        let mut good = false;
        for r in refs {
            self.progress.advance(r.len);
            let error = match &checked {
                Ok(n) if *n as u64 == r.len => {
                    if !good {
                        self.report.chunks_checked += 1;
                        self.report.bytes_checked += r.len;
                        good = true;
                    }
                    continue;
                }
                Ok(n) => FormatError::corrupt(
                    format!("chunk {d}"),
                    format!("{n} bytes where the index needs {}", r.len),
                )
                .full_message(),
                Err(e) => e.clone(),
            };
            let place = &self.places[r.place];
            let p = problem(
                &place.point,
                Some(&place.disk),
                Some(&place.volume),
                Some(r.offset),
                Some(&d),
                error,
            );
            self.problems.push((r.order, p));
        }
        if good {
            if self.seen.len() >= SEEN_LIMIT {
                self.seen.clear();
            }
            self.seen.insert(d);
        }
    }

    /// Waits for the checks under way and puts the problems in walk order.
    fn finish(mut self) -> VerifyReport {
        self.jobs = None; // the workers end once the queue is empty
        while !self.waiting.is_empty() {
            self.settle_one();
        }
        self.problems.sort_by_key(|(order, _)| *order);
        self.report.problems = self.problems.into_iter().map(|(_, p)| p).collect();
        self.report
    }
}

fn problem(
    point: &str,
    disk: Option<&str>,
    volume: Option<&str>,
    offset: Option<u64>,
    chunk: Option<&Digest>,
    error: String,
) -> Problem {
    Problem {
        point: point.to_string(),
        disk: disk.map(str::to_string),
        volume: volume.map(str::to_string),
        offset,
        chunk: chunk.map(Digest::to_hex),
        error,
    }
}
