//! Capturing one volume: read chunks in order, hash and compress them on worker threads,
//! store new chunks, and write the index in volume order.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Read};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use bkimg_format::index::{EntryReader, IndexWriter};
use bkimg_format::store::StoreWrite;
use bkimg_format::{chunk, Digest};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::ranges::RangeCursor;
use crate::region::Region;
use bkimg_format::buf::AlignedBuf;
use bkimg_format::progress::Progress;

/// How far ahead of the reader the kernel is asked to read.
const PREFETCH: u64 = 16 << 20;

pub type RangeIter = Box<dyn Iterator<Item = io::Result<Range<u64>>> + Send>;

/// What to capture of one volume and what to compare it with.
pub struct VolumeJob {
    pub region: Region,
    pub chunk_size: u32,
    /// Byte ranges the filesystem uses; everything else is stored as holes.
    pub used: Option<RangeIter>,
    /// The parent's index of the same volume (same size and chunk size).
    pub parent: Option<EntryReader<Box<dyn Read + Send>>>,
    /// Byte ranges that may have changed since the parent; requires `parent`. Chunks
    /// outside them are taken from the parent without being read.
    pub changed: Option<Vec<Range<u64>>>,
    pub level: i32,
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeStats {
    pub bytes_read: u64,
    pub bytes_data: u64,
    pub bytes_stored_new: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
}

/// The workers or the index writer stopped early; their own error says why.
#[derive(Debug)]
struct WorkersStopped;

impl std::fmt::Display for WorkersStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("capture workers stopped")
    }
}

impl std::error::Error for WorkersStopped {}

/// One chunk to read, hash and store: workers read it themselves, so reads run as many
/// at a time as there are workers (the depth O_DIRECT reads need to keep a disk busy).
struct Work {
    seq: u64,
    /// Offset within the volume, and length (the last chunk may be short).
    start: u64,
    len: usize,
    /// Parts of the chunk the filesystem does not use (volume offsets): stored as zeros.
    unused: Vec<Range<u64>>,
    parent: Option<Digest>,
}

/// Counters the workers share, and the chunks being stored right now.
#[derive(Default)]
struct Shared {
    stored_new: AtomicU64,
    chunks_new: AtomicU64,
    bytes_data: AtomicU64,
    /// Digests a worker is encoding and storing (at most one per worker): a volume that
    /// repeats itself hands the same new chunk to two workers at once, and only one may
    /// store and count it.
    storing: std::sync::Mutex<std::collections::HashSet<Digest>>,
}

/// A worker's claim on storing one chunk; released when dropped, after the chunk is in
/// the store.
struct Storing<'a> {
    shared: &'a Shared,
    digest: Digest,
}

impl Shared {
    /// Claims `digest` for storing; `None` if another worker holds it.
    fn claim(&self, digest: Digest) -> Option<Storing<'_>> {
        let mut set = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        // Built only when the claim is taken (a guard built and dropped here would lock
        // the mutex held above, and release another worker's claim).
        if !set.insert(digest) {
            return None;
        }
        Some(Storing {
            shared: self,
            digest,
        })
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        let mut set = self
            .shared
            .storing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(&self.digest);
    }
}

struct Done {
    seq: u64,
    digest: Digest,
}

pub fn capture_volume(
    job: VolumeJob,
    store: &dyn StoreWrite,
    progress: &dyn Progress,
) -> Result<(Digest, VolumeStats)> {
    let size = job.region.len();
    let cs = u64::from(job.chunk_size);
    let count = size.div_ceil(cs);
    let shared = Shared::default();
    let (scratch, scratch_path) = store.scratch_file()?;
    let index = IndexWriter::new(
        BufWriter::with_capacity(1 << 20, scratch),
        size,
        job.chunk_size,
    )
    .context("writing the volume index")?;

    let workers = job.workers.max(1);
    let (work_tx, work_rx) = bounded::<Work>(workers * 4);
    let (done_tx, done_rx) = bounded::<Result<Done>>(workers * 8 + 64);
    let mut stats = VolumeStats::default();

    let header = std::thread::scope(|s| -> Result<_> {
        for _ in 0..workers {
            let rx = work_rx.clone();
            let tx = done_tx.clone();
            let region = job.region.clone();
            let shared = &shared;
            s.spawn(move || worker(rx, tx, region, store, job.level, shared));
        }
        drop(work_rx);
        let collector = s.spawn(move || collect(done_rx, index, count));
        let produced = produce(job, &work_tx, &done_tx, progress, &mut stats);
        drop(work_tx);
        drop(done_tx);
        let collected = collector
            .join()
            .map_err(|_| anyhow!("index writer panicked"))?;
        // The first cause wins: a read error from the producer, else a worker's error
        // (which also closes the channels and so stops the producer).
        match produced {
            Err(e) if !e.is::<WorkersStopped>() => Err(e),
            _ => collected,
        }
    })?;

    let (header, writer) = header;
    let file = writer
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the volume index")?;
    drop(file);
    let id = header.id();
    store.put_index(&id, &scratch_path)?;
    stats.bytes_stored_new = shared.stored_new.load(Ordering::Relaxed);
    stats.chunks_new = shared.chunks_new.load(Ordering::Relaxed);
    stats.bytes_data += shared.bytes_data.load(Ordering::Relaxed);
    Ok((id, stats))
}

/// Walks the volume in chunk order, deciding for each chunk whether it must be read.
fn produce(
    job: VolumeJob,
    work: &Sender<Work>,
    done: &Sender<Result<Done>>,
    progress: &dyn Progress,
    stats: &mut VolumeStats,
) -> Result<()> {
    let size = job.region.len();
    let cs = u64::from(job.chunk_size);
    let mut used = job.used.map(RangeCursor::new);
    let mut changed = job
        .changed
        .map(|v| RangeCursor::new(v.into_iter().map(Ok::<_, io::Error>)));
    let mut parent = job.parent;
    let mut parent_batch = Vec::new();
    let mut parent_pos = 0usize;
    let mut overlap = Vec::new();
    let closed = || anyhow::Error::new(WorkersStopped);

    let mut seq = 0u64;
    let mut start = 0u64;
    let mut prefetched = 0u64;
    while start < size {
        let end = (start + cs).min(size);
        let parent_digest = match parent.as_mut() {
            Some(p) => {
                if parent_pos == parent_batch.len() {
                    p.next_batch(4096, &mut parent_batch)?;
                    parent_pos = 0;
                }
                let d = *parent_batch
                    .get(parent_pos)
                    .ok_or_else(|| anyhow!("parent index ended early"))?;
                parent_pos += 1;
                Some(d)
            }
            None => None,
        };
        progress.advance(end - start);

        let mut unused = Vec::new();
        if let Some(u) = used.as_mut() {
            u.overlaps(start, end, &mut overlap)
                .context("reading the filesystem's allocation map")?;
            if overlap.is_empty() {
                done.send(Ok(Done {
                    seq,
                    digest: Digest::HOLE,
                }))
                .map_err(|_| closed())?;
                seq += 1;
                start = end;
                continue;
            }
            unused = complement(start, end, &overlap);
        }
        if let (Some(c), Some(pd)) = (changed.as_mut(), parent_digest) {
            c.overlaps(start, end, &mut overlap)?;
            if overlap.is_empty() {
                if !pd.is_hole() {
                    stats.bytes_data += end - start;
                }
                done.send(Ok(Done { seq, digest: pd }))
                    .map_err(|_| closed())?;
                seq += 1;
                start = end;
                continue;
            }
        }
        if start >= prefetched && !job.region.is_direct() {
            // Ask the kernel to read the next window ahead while this one is processed.
            prefetched = start + PREFETCH;
            let _ = nix::fcntl::posix_fadvise(
                job.region.file().as_raw_fd(),
                (job.region.offset() + start) as i64,
                PREFETCH.min(size - start) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
        stats.bytes_read += end - start;
        work.send(Work {
            seq,
            start,
            len: (end - start) as usize,
            unused,
            parent: parent_digest,
        })
        .map_err(|_| closed())?;
        seq += 1;
        start = end;
    }
    if let Some(p) = parent.as_mut() {
        // Read to the end so the parent index's own digest is checked.
        p.next_batch(1, &mut parent_batch)?;
    }
    Ok(())
}

fn complement(start: u64, end: u64, inside: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut pos = start;
    for r in inside {
        if r.start > pos {
            out.push(pos..r.start);
        }
        pos = r.end;
    }
    if pos < end {
        out.push(pos..end);
    }
    out
}

fn worker(
    rx: Receiver<Work>,
    tx: Sender<Result<Done>>,
    region: Region,
    store: &dyn StoreWrite,
    level: i32,
    shared: &Shared,
) {
    let mut blob = Vec::new();
    let mut buf = AlignedBuf::default();
    let ids = store.chunk_ids();
    for w in rx {
        let result = (|| -> Result<Done> {
            region
                .read_into(&mut buf, w.start, w.len)
                .with_context(|| {
                    format!(
                        "reading the source at byte {} (did it shrink or fail?)",
                        region.offset() + w.start
                    )
                })?;
            let data = buf.data_mut();
            // Free blocks' old contents are not data: zero them so they compress and dedup.
            for r in &w.unused {
                data[(r.start - w.start) as usize..(r.end - w.start) as usize].fill(0);
            }
            let data = buf.data();
            if !bkimg_format::digest::is_zero(data) {
                shared.bytes_data.fetch_add(w.len as u64, Ordering::Relaxed);
            }
            let digest = ids.of(data);
            if digest.is_hole() || w.parent == Some(digest) || store.has_chunk(&digest)? {
                return Ok(Done { seq: w.seq, digest });
            }
            // Another worker storing the same chunk: it is present once that one is done.
            // A claim taken after the holder let go sees its stored file on the re-check.
            let Some(_storing) = shared.claim(digest) else {
                return Ok(Done { seq: w.seq, digest });
            };
            if store.has_chunk(&digest)? {
                return Ok(Done { seq: w.seq, digest });
            }
            chunk::encode_into(data, digest, level, &mut blob)?;
            store.put_chunk(&digest, &blob)?;
            shared
                .stored_new
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
            shared.chunks_new.fetch_add(1, Ordering::Relaxed);
            Ok(Done { seq: w.seq, digest })
        })();
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

type IndexOut = IndexWriter<BufWriter<std::fs::File>>;

/// Puts digests back in volume order and writes them to the index.
fn collect(
    rx: Receiver<Result<Done>>,
    mut index: IndexOut,
    count: u64,
) -> Result<(bkimg_format::index::IndexHeader, BufWriter<std::fs::File>)> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for done in rx {
        let done = done?;
        pending.insert(done.seq, done.digest);
        while let Some(d) = pending.remove(&next) {
            index.push(&d).context("writing the volume index")?;
            next += 1;
        }
    }
    if next != count {
        return Err(anyhow!("capture stopped after {next} of {count} chunks"));
    }
    index.finish().context("writing the volume index")
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    #[test]
    fn one_worker_at_a_time_stores_a_digest() {
        let shared = Shared::default();
        let d = Digest::of_chunk(b"some chunk");
        let first = shared.claim(d).expect("free");
        // A second claim is refused, and refusing does not release the first.
        assert!(shared.claim(d).is_none());
        assert!(shared.claim(d).is_none());
        let other = shared
            .claim(Digest::of_chunk(b"another"))
            .expect("another digest");
        drop(other);
        drop(first);
        assert!(shared.claim(d).is_some(), "free again once stored");
    }
}
