//! `bkimg replicate --to s3://...`: the restore points the bucket lacks, parents first;
//! of each, the chunks the bucket lacks (checked before they leave, sent in parallel),
//! then its indexes, then its manifest, so the bucket never lists a restore point whose
//! objects are not all there. A rerun lists what arrived and sends the rest.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::{StoreMaintain, StoreRead};
use bkimg_format::{chunk, Digest, FormatError};

use super::S3Store;
use crate::throttle::Throttle;
use crate::{ReplicateOptions, ShipReport};
use bkimg_format::progress::Progress;

/// Requests in flight when the caller does not say: enough to hide the latency of one
/// PUT of a ~100 KiB blob (measured on loopback: spec/s3-layout.md).
pub const DEFAULT_PARALLEL: usize = 16;

/// One restore point to send: what of it the bucket lacks.
struct Plan {
    point: Point,
    /// Chunks not in the bucket and not sent earlier in this run, with their plaintext
    /// length (from the index).
    chunks: Vec<(Digest, Option<u32>)>,
    indexes: Vec<Digest>,
}

///
/// `raw` is the store under `src` as it holds its objects: they are shipped as stored
/// (sealed, in an encrypted repository), and checked through `src` before they leave.
pub fn replicate(
    src: &Repository,
    raw: &dyn StoreRead,
    store: &S3Store,
    opts: &ReplicateOptions,
    progress: &dyn Progress,
) -> Result<ShipReport> {
    let started = Instant::now();
    let remote = |what: &str| {
        let what = what.to_string();
        move |f: super::Failure| f.into_anyhow(&what)
    };
    let resume = "nothing incomplete is listed on the target: run the same command again to resume";
    let with_resume = |e: anyhow::Error| -> anyhow::Error {
        match e.downcast::<crate::RemoteError>() {
            Ok(crate::RemoteError::Unreachable(m)) => {
                crate::RemoteError::Unreachable(format!("{m}; {resume}")).into()
            }
            Ok(other) => other.into(),
            Err(e) => e,
        }
    };

    // Keeps a prune of the bucket from deleting chunks this run counts on.
    let _lock = store.lock(super::LockKind::Ship, false)?;
    // Tests hold a replication here, its lock taken.
    bkimg_format::testhook::pause("s3-ship-locked");
    let present: HashSet<String> = store
        .point_ids()
        .map_err(remote("the restore points in the bucket"))
        .map_err(with_resume)?
        .into_iter()
        .collect();
    let (wanted, damaged) = crate::points_to_ship(src, &opts.ids)?;
    for (id, e) in damaged {
        progress.note(&format!(
            "not shipping restore point {id}: {} (bkimg verify names the damage)",
            e.full_message()
        ));
    }
    let mut report = ShipReport::default();
    let mut to_send = Vec::new();
    for p in wanted {
        if present.contains(&p.manifest.id) {
            report.points_present += 1;
        } else {
            to_send.push(p);
        }
    }
    if to_send.is_empty() {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    store
        .load_chunk_listing()
        .map_err(remote("the chunks in the bucket"))
        .map_err(with_resume)?;
    let have_indexes = store
        .index_ids()
        .map_err(remote("the indexes in the bucket"))
        .map_err(with_resume)?;

    // What each point lacks; a chunk shared by several is sent with the first.
    let mut queued: HashSet<Digest> = HashSet::new();
    let mut counted_present: HashSet<Digest> = HashSet::new();
    let mut plans = Vec::new();
    let mut total = 0u64;
    let mut batch = Vec::new();
    for point in to_send {
        let mut plan = Plan {
            point,
            chunks: Vec::new(),
            indexes: Vec::new(),
        };
        for (_, _, index) in plan.point.manifest.indexes() {
            let Some(index) = index else { continue };
            // Reading every entry checks the index against its digest.
            let mut entries = src
                .index(&index)
                .with_context(|| format!("reading local volume index {index}"))?;
            let h = *entries.header();
            let mut entry = 0u64;
            loop {
                entries.next_batch(8192, &mut batch)?;
                if batch.is_empty() {
                    break;
                }
                for d in &batch {
                    let len = h.chunk_len(entry);
                    entry += 1;
                    if d.is_hole() || queued.contains(d) {
                        continue;
                    }
                    // Present means listed with the size stored here: an object cut
                    // short or replaced in the bucket is sent again.
                    if let Some(listed) = store
                        .chunk_listed(d)
                        .map_err(remote("the chunks in the bucket"))?
                    {
                        match raw.stored_chunk_len(d)? {
                            Some(local) if local != listed => {
                                progress.note(&format!(
                                    "chunk {d} is {listed} bytes in the bucket where it is \
                                     {local}: sending it again"
                                ));
                                report.chunks_resent += 1;
                            }
                            _ => {
                                if counted_present.insert(*d) {
                                    report.chunks_present += 1;
                                }
                                continue;
                            }
                        }
                    }
                    queued.insert(*d);
                    plan.chunks.push((*d, Some(len)));
                    total += u64::from(len);
                }
            }
            if !have_indexes.contains(&index) && !plan.indexes.contains(&index) {
                plan.indexes.push(index);
            }
        }
        plans.push(plan);
    }
    drop(counted_present);

    progress.begin("upload", total);
    let throttle = Throttle::new(opts.bandwidth);
    let parallel = opts.parallel.unwrap_or(DEFAULT_PARALLEL).clamp(1, 256);
    let bytes_sent = AtomicU64::new(0);
    let mut shipped: HashSet<String> = HashSet::new();
    for plan in plans {
        let id = plan.point.manifest.id.clone();
        let sent = send_chunks(
            src,
            raw,
            store,
            &plan.chunks,
            parallel,
            &throttle,
            &bytes_sent,
            progress,
        )
        .map_err(with_resume)
        .with_context(|| format!("sending the chunks of restore point {id}"))?;
        report.chunks_sent += sent;
        for index in &plan.indexes {
            let mut input = raw.open_index(index)?;
            let n = store
                .put_stream(&store.key_index(index), &mut input, 0, &|n| {
                    throttle.take_blocking(n)
                })
                .map_err(remote(&format!("volume index {index}")))
                .map_err(with_resume)?;
            bytes_sent.fetch_add(n, Ordering::Relaxed);
        }
        // A parent pruned here and absent there: its record ends the chain there too.
        if let Some(link) = &plan.point.manifest.parent {
            // Checked through the key, shipped as stored.
            if !present.contains(&link.id)
                && !shipped.contains(&link.id)
                && src.pruned_link(link)?.is_some()
            {
                let stored = raw
                    .read_prune_record(&link.id)?
                    .ok_or_else(|| FormatError::missing(format!("prune record of {}", link.id)))?;
                store
                    .put_prune_record(&link.id, &stored)
                    .map_err(anyhow::Error::from)
                    .map_err(with_resume)?;
            }
        }
        // The commit point: last, after the server acknowledged everything it names.
        let manifest = raw.read_manifest(&id)?;
        throttle.take_blocking(manifest.len() as u64);
        bytes_sent.fetch_add(manifest.len() as u64, Ordering::Relaxed);
        store
            .put(&store.key_point(&id), manifest)
            .map_err(remote(&format!("restore point {id}")))
            .map_err(with_resume)?;
        progress.note(&format!("restore point {id} is on {}", store.url()));
        shipped.insert(id.clone());
        report.points_sent.push(id);
    }
    report.bytes_sent = bytes_sent.load(Ordering::Relaxed);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// `bkimg verify --repair-from`: sends `chunks` again (damaged or missing in the bucket)
/// from the local repository `src`, whose objects as stored `raw` holds; each is checked
/// against its digest before it leaves. Returns how many were sent, and the chunks the
/// local repository lacks too.
pub fn resend_chunks(
    src: &Repository,
    raw: &dyn StoreRead,
    store: &S3Store,
    chunks: &[Digest],
    parallel: usize,
    progress: &dyn Progress,
) -> Result<(u64, Vec<Digest>)> {
    // Keeps a prune of the bucket from deleting what is being put back.
    let _lock = store.lock(super::LockKind::Ship, false)?;
    let mut have = Vec::new();
    let mut lacking = Vec::new();
    for (d, has) in chunks.iter().zip(raw.has_chunks(chunks)?) {
        if has {
            have.push((*d, None));
        } else {
            lacking.push(*d);
        }
    }
    let bytes_sent = AtomicU64::new(0);
    let sent = send_chunks(
        src,
        raw,
        store,
        &have,
        parallel.clamp(1, 256),
        &Throttle::new(None),
        &bytes_sent,
        progress,
    )?;
    Ok((sent, lacking))
}

/// Sends `chunks` with `parallel` requests in flight; each blob is read and checked
/// against its digest (and its plaintext length, when known) first. Memory: two buffers
/// per sender. Returns the count sent.
#[allow(clippy::too_many_arguments)]
fn send_chunks(
    src: &Repository,
    raw: &dyn StoreRead,
    store: &S3Store,
    chunks: &[(Digest, Option<u32>)],
    parallel: usize,
    throttle: &Throttle,
    bytes_sent: &AtomicU64,
    progress: &dyn Progress,
) -> Result<u64> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..parallel.min(chunks.len()) {
            s.spawn(|| {
                let (mut blob, mut opened, mut plain) = (Vec::new(), Vec::new(), Vec::new());
                let ids = src.chunk_ids();
                let sealed = src.protection() == bkimg_format::keys::Mode::Encrypted;
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(d, len)) = chunks.get(i) else {
                        break;
                    };
                    let result = (|| -> Result<()> {
                        raw.read_chunk(&d, &mut blob)?;
                        let check = if sealed {
                            opened.clone_from(&blob);
                            src.store().open_stored_chunk(&d, &mut opened)?;
                            &opened
                        } else {
                            &blob
                        };
                        chunk::decode_into(check, &d, &ids, &mut plain).map_err(|e| {
                            anyhow::Error::from(e).context(
                                "the local repository is damaged: this chunk is not shipped \
                                 (run bkimg verify on the repository)",
                            )
                        })?;
                        if let Some(len) = len.filter(|&len| plain.len() != len as usize) {
                            return Err(FormatError::corrupt(
                                format!("chunk {d}"),
                                format!("{} bytes where the index needs {len}", plain.len()),
                            )
                            .into());
                        }
                        let n = blob.len() as u64;
                        throttle.take_blocking(n);
                        store
                            .put_chunk_blob(&d, std::mem::take(&mut blob))
                            .map_err(|f| f.into_anyhow(&format!("chunk {d}")))?;
                        bytes_sent.fetch_add(n, Ordering::Relaxed);
                        sent.fetch_add(1, Ordering::Relaxed);
                        progress.advance(len.map_or(plain.len() as u64, u64::from));
                        Ok(())
                    })();
                    if let Err(e) = result {
                        stop.store(true, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(sent.load(Ordering::Relaxed)),
    }
}
