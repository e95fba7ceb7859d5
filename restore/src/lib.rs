//! Restore: writes a restore point back to disks or image files; verify: checks a
//! repository end to end.
#![deny(unsafe_code)]

pub mod gpt;
mod swap;
mod sys;
pub mod target;
pub mod verify;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::buf::AlignedBuf;
use bkimg_format::manifest::{Content, Disk, PartitionTable, Volume};
use bkimg_format::progress::Progress;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::{chunk, Digest, FormatError};
use crossbeam_channel::bounded;
use serde::Serialize;

use crate::target::Target;

/// What to restore where.
pub struct RestoreRequest {
    /// Disk name (as in the manifest) and the target path for it.
    pub targets: Vec<(String, PathBuf)>,
    /// Restore only this volume ("p2", "2", "whole") of the (single) named disk.
    pub volume: Option<String>,
    pub workers: usize,
}

#[derive(Debug, Serialize)]
pub struct DiskPlan {
    pub disk: String,
    pub target: String,
    pub source_size: u64,
    pub volumes: Vec<VolumePlan>,
    pub table: String,
}

#[derive(Debug, Serialize)]
pub struct VolumePlan {
    pub volume: String,
    pub target_offset: u64,
    pub size: u64,
    pub action: String,
}

/// Matches disks to targets and volumes to offsets, without touching any target.
pub fn plan(point: &Point, req: &RestoreRequest) -> Result<Vec<DiskPlan>> {
    let m = &point.manifest;
    let mut plans = Vec::new();
    for (disk_name, target) in &req.targets {
        let disk = m
            .disks
            .iter()
            .find(|d| &d.name == disk_name)
            .ok_or_else(|| anyhow!("restore point {} has no disk {disk_name}", m.id))?;
        let volumes: Vec<&Volume> = match &req.volume {
            Some(sel) => vec![select_volume(disk, sel)?],
            None => disk.volumes.iter().collect(),
        };
        let whole = req.volume.is_none();
        plans.push(DiskPlan {
            disk: disk.name.clone(),
            target: target.display().to_string(),
            source_size: disk.size,
            table: if whole {
                table_name(&disk.table)
            } else {
                "untouched".into()
            },
            volumes: volumes
                .iter()
                .map(|v| VolumePlan {
                    volume: v.name.clone(),
                    target_offset: if whole { v.offset } else { 0 },
                    size: v.size,
                    action: match &v.content {
                        Content::Swap { .. } => "write swap header".into(),
                        Content::Data { bytes_data, .. } => {
                            format!("write {bytes_data} bytes of data, zero the rest")
                        }
                    },
                })
                .collect(),
        });
    }
    Ok(plans)
}

fn table_name(t: &PartitionTable) -> String {
    match t {
        PartitionTable::None => "none".into(),
        PartitionTable::Gpt(g) => format!("GPT with {} partitions", g.partitions.len()),
        PartitionTable::Msdos(m) => format!("msdos with {} partitions", m.partitions.len()),
    }
}

fn select_volume<'a>(disk: &'a Disk, sel: &str) -> Result<&'a Volume> {
    let by_number = sel.parse::<u32>().ok();
    disk.volumes
        .iter()
        .find(|v| v.name == sel || (by_number.is_some() && v.partition == by_number))
        .ok_or_else(|| {
            anyhow!(
                "{} has no volume {sel:?}; it has: {}",
                disk.name,
                disk.volumes
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub chunks_verified: u64,
}

/// Restores per `req`. Every target is opened and checked, and every index read and
/// every chunk's presence checked, before the first byte is written.
pub fn restore(
    repo: &Repository,
    point: &Point,
    req: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let mut created = Vec::new();
    let result = restore_all(repo, point, req, progress, &mut created);
    if result.is_err() {
        // A file this restore created holds nothing usable: never leave it looking like an
        // image. (Existing targets are not removed: they are the user's.)
        for path in created {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

fn restore_all(
    repo: &Repository,
    point: &Point,
    req: &RestoreRequest,
    progress: &dyn Progress,
    created: &mut Vec<PathBuf>,
) -> Result<RestoreReport> {
    let plans = plan(point, req)?;
    let m = &point.manifest;
    let mut opened = Vec::new();
    for p in &plans {
        let disk = m.disks.iter().find(|d| d.name == p.disk).expect("planned");
        let (need, sector) = need_of(disk, p, req);
        let target = Target::open(&PathBuf::from(&p.target), need, Some(need), sector)?;
        if target.fresh {
            created.push(target.path.clone());
        }
        opened.push((disk, p, target));
    }
    let total: u64 = plans.iter().flat_map(|p| &p.volumes).map(|v| v.size).sum();
    progress.begin("check", total);
    for (disk, plan, _) in &opened {
        for vp in &plan.volumes {
            let v = planned_volume(disk, vp);
            preflight(repo, m.chunk_size, v, req.workers).with_context(|| {
                format!(
                    "restore point {} is not restorable ({} {})",
                    m.id, disk.name, v.name
                )
            })?;
        }
    }

    let mut report = RestoreReport::default();
    // Tests stop a restore here, its targets open, to signal it.
    bkimg_format::testhook::pause("restore-writing");
    progress.begin("restore", total);
    for (disk, plan, target) in &opened {
        for vp in &plan.volumes {
            let v = planned_volume(disk, vp);
            restore_volume(
                repo,
                v,
                target,
                vp.target_offset,
                req.workers,
                progress,
                &mut report,
            )
            .with_context(|| format!("restoring {} {} to {}", disk.name, v.name, plan.target))?;
        }
        if req.volume.is_none() {
            write_table(disk, target)?;
        }
        target
            .file
            .sync_all()
            .with_context(|| format!("flushing {}", plan.target))?;
        if target.is_block_device && req.volume.is_none() {
            // Best effort: loop devices without partition scanning refuse, which is fine.
            let _ = sys::reread_partition_table(&target.file);
        }
    }
    Ok(report)
}

/// The manifest volume a plan entry was made from.
fn planned_volume<'a>(disk: &'a Disk, vp: &VolumePlan) -> &'a Volume {
    disk.volumes
        .iter()
        .find(|v| v.name == vp.volume)
        .expect("plans are made from the manifest")
}

/// Bytes a target needs, and the sector size it must have (a whole disk's partition table
/// is only found on a device with the same sector size).
fn need_of(disk: &Disk, plan: &DiskPlan, req: &RestoreRequest) -> (u64, Option<u32>) {
    match &req.volume {
        Some(_) => (plan.volumes[0].size, None),
        None => (disk.size, Some(disk.logical_sector_size)),
    }
}

/// Runs every check `restore` makes on the targets, without creating or writing anything
/// (for `--dry-run`). Returns, per planned disk, whether its target would be created.
pub fn check_targets(point: &Point, req: &RestoreRequest) -> Result<Vec<bool>> {
    let plans = plan(point, req)?;
    let mut created = Vec::new();
    for p in &plans {
        let disk = point
            .manifest
            .disks
            .iter()
            .find(|d| d.name == p.disk)
            .expect("planned");
        let (need, sector) = need_of(disk, p, req);
        created.push(Target::check(&PathBuf::from(&p.target), need, sector)?);
    }
    Ok(created)
}

/// Reads the whole index (checking its digest) and checks each chunk is present.
/// Checks that every chunk of `v` is present before the target is touched, `workers`
/// checks at a time (each may wait for storage: cold metadata on a local disk, a listing on
/// S3).
fn preflight(repo: &Repository, chunk_size: u32, v: &Volume, workers: usize) -> Result<()> {
    let Content::Data { index, .. } = &v.content else {
        return Ok(());
    };
    let id = Digest::from_hex(index)
        .ok_or_else(|| FormatError::corrupt("manifest", format!("bad index id {index:?}")))?;
    let mut entries = repo.index(&id)?;
    let h = *entries.header();
    if h.volume_size != v.size || h.chunk_size != chunk_size {
        return Err(FormatError::corrupt(
            format!("volume index {id}"),
            "its size or chunk size differs from the manifest",
        )
        .into());
    }
    let mut batch = Vec::new();
    let mut entry = 0u64;
    let workers = workers.max(1);
    loop {
        entries.next_batch(8192, &mut batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        // The first entry (in volume order) whose chunk is absent, if any.
        let share = batch.len().div_ceil(workers);
        let first_absent = std::thread::scope(|s| -> Result<Option<usize>> {
            let handles: Vec<_> = batch
                .chunks(share)
                .enumerate()
                .map(|(n, part)| {
                    s.spawn(move || -> Result<Option<usize>> {
                        // One question per part (a remote store answers it in few requests).
                        let data: Vec<(usize, Digest)> = part
                            .iter()
                            .enumerate()
                            .filter(|(_, d)| !d.is_hole())
                            .map(|(i, d)| (i, *d))
                            .collect();
                        let digests: Vec<Digest> = data.iter().map(|(_, d)| *d).collect();
                        let present = repo.store().has_chunks(&digests)?;
                        Ok(data
                            .iter()
                            .zip(present)
                            .find(|(_, here)| !here)
                            .map(|((i, _), _)| n * share + i))
                    })
                })
                .collect();
            let mut first = None;
            for h in handles {
                let found = h.join().map_err(|_| anyhow!("restore check panicked"))??;
                first = first.or(found);
            }
            Ok(first)
        })?;
        if let Some(i) = first_absent {
            let d = &batch[i];
            let at = format!(
                "volume {} at byte {}",
                v.name,
                (entry + i as u64) * u64::from(chunk_size)
            );
            // Present but damaged is not the same as missing: read it for the reason.
            let (mut blob, mut plain) = (Vec::new(), Vec::new());
            return Err(match repo.chunk(d, &mut blob, &mut plain) {
                Err(e) => anyhow::Error::from(e).context(at),
                Ok(()) => FormatError::missing(format!("chunk {d} ({at})")).into(),
            });
        }
        entry += batch.len() as u64;
    }
}

fn restore_volume(
    repo: &Repository,
    v: &Volume,
    target: &Target,
    base: u64,
    workers: usize,
    progress: &dyn Progress,
    report: &mut RestoreReport,
) -> Result<()> {
    let index = match &v.content {
        Content::Swap {
            uuid,
            label,
            page_size,
        } => {
            let page = swap::header(v.size, *page_size, uuid.as_deref(), label.as_deref())?;
            target
                .file
                .write_all_at(&page, base)
                .context("writing the swap header")?;
            report.bytes_written += page.len() as u64;
            progress.advance(v.size);
            return Ok(());
        }
        Content::Data { index, .. } => Digest::from_hex(index).expect("checked in preflight"),
    };
    let mut entries = repo.index(&index)?;
    let h = *entries.header();
    let cs = u64::from(h.chunk_size);
    let workers = workers.max(1);
    let (tx, rx) = bounded::<(u64, u32, Digest)>(workers * 4);
    let written = std::sync::atomic::AtomicU64::new(0);
    let verified = std::sync::atomic::AtomicU64::new(0);

    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let rx = rx.clone();
            let (written, verified) = (&written, &verified);
            handles.push(s.spawn(move || -> Result<()> {
                let (mut blob, mut plain) = (Vec::new(), AlignedBuf::default());
                let ids = repo.chunk_ids();
                for (offset, len, digest) in rx {
                    repo.store().read_chunk(&digest, &mut blob)?;
                    let n = chunk::plain_len(&blob, &digest)?;
                    if n != len as usize {
                        return Err(FormatError::corrupt(
                            format!("chunk {digest}"),
                            format!("{n} bytes where the index needs {len}"),
                        )
                        .into());
                    }
                    plain.prepare(n);
                    chunk::decode_to(&blob, &digest, &ids, plain.data_mut())?;
                    let plain = plain.data();
                    target.write_at(plain, base + offset).with_context(|| {
                        format!(
                            "writing {} at byte {}",
                            target.path.display(),
                            base + offset
                        )
                    })?;
                    written.fetch_add(plain.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    verified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    progress.advance(u64::from(len));
                }
                Ok(())
            }));
        }
        drop(rx);
        let produced = (|| -> Result<()> {
            let mut batch = Vec::new();
            let mut entry = 0u64;
            let mut hole: Option<(u64, u64)> = None;
            loop {
                entries.next_batch(8192, &mut batch)?;
                if batch.is_empty() {
                    break;
                }
                for d in &batch {
                    let offset = entry * cs;
                    let len = h.chunk_len(entry);
                    entry += 1;
                    if d.is_hole() {
                        hole = match hole {
                            Some((s, l)) if s + l == offset => Some((s, l + u64::from(len))),
                            other => {
                                if let Some((s, l)) = other {
                                    zero(target, base + s, l, report)?;
                                }
                                Some((offset, u64::from(len)))
                            }
                        };
                        progress.advance(u64::from(len));
                        continue;
                    }
                    if tx.send((offset, len, *d)).is_err() {
                        return Ok(()); // a worker failed; its error is reported below
                    }
                }
            }
            if let Some((s, l)) = hole {
                zero(target, base + s, l, report)?;
            }
            Ok(())
        })();
        drop(tx);
        for h in handles {
            h.join().map_err(|_| anyhow!("restore worker panicked"))??;
        }
        produced
    })?;
    report.bytes_written += written.into_inner();
    report.chunks_verified += verified.into_inner();
    Ok(())
}

/// Makes a range read as zeros: nothing on a fresh sparse file, a hole punch or zero-range
/// request elsewhere, written zeros when the kernel cannot do either.
fn zero(target: &Target, offset: u64, len: u64, report: &mut RestoreReport) -> Result<()> {
    if target.fresh || len == 0 {
        return Ok(());
    }
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let flags = if target.is_block_device {
        FallocateFlags::FALLOC_FL_ZERO_RANGE
    } else {
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
    };
    report.bytes_zeroed += len;
    if fallocate(target.file.as_raw_fd(), flags, offset as i64, len as i64).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        target
            .file
            .write_all_at(&zeros[..n], offset + done)
            .with_context(|| {
                format!(
                    "zeroing {} at byte {}",
                    target.path.display(),
                    offset + done
                )
            })?;
        done += n as u64;
    }
    Ok(())
}

/// Writes the partition table. msdos tables (and their extended boot records) come back
/// with the gap volumes; GPT is rewritten so its backup sits at the target's end.
fn write_table(disk: &Disk, target: &Target) -> Result<()> {
    let PartitionTable::Gpt(table) = &disk.table else {
        return Ok(());
    };
    let ss = disk.logical_sector_size;
    let mut lba0 = vec![0u8; 512];
    target
        .file
        .read_exact_at(&mut lba0, 0)
        .context("reading back the boot sector")?;
    if target.size != disk.size {
        gpt::patch_protective_mbr(&mut lba0, target.size, ss);
        // The old backup header now sits in free space: clear it so no tool finds it.
        let old_backup = disk.size - u64::from(ss);
        target
            .file
            .write_all_at(&vec![0u8; ss as usize], old_backup)
            .context("clearing the old backup GPT header")?;
    }
    target
        .file
        .write_all_at(&lba0, 0)
        .context("writing the protective MBR")?;
    for (offset, bytes) in gpt::encode(table, target.size, ss, disk.size)?.writes {
        target
            .file
            .write_all_at(&bytes, offset)
            .context("writing the GPT")?;
    }
    Ok(())
}

/// Disk names of a restore point, for matching `--target` arguments.
pub fn disk_names(point: &Point) -> Vec<String> {
    point
        .manifest
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect()
}

/// Pairs `--target` arguments with disks: "PATH" for a single-disk restore point, or
/// "DISK=PATH" for each disk.
pub fn match_targets(point: &Point, args: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let names = disk_names(point);
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for a in args {
        let (disk, path) = match a.split_once('=') {
            Some((d, p)) if names.iter().any(|n| n == d) => (d.to_string(), PathBuf::from(p)),
            _ if args.len() == 1 && names.len() == 1 => (names[0].clone(), PathBuf::from(a)),
            _ => bail!(
                "restore point {} has disks {}: give --target DISK=PATH for each disk to restore",
                point.manifest.id,
                names.join(", ")
            ),
        };
        if seen.insert(disk.clone(), ()).is_some() {
            bail!("{disk} is named by more than one --target");
        }
        let same_path = out.iter().any(|(_, q): &(String, PathBuf)| {
            q == &path || target::identity(q).is_some_and(|id| Some(id) == target::identity(&path))
        });
        if same_path {
            return Err(target::TargetError::Duplicate {
                path: path.display().to_string(),
            }
            .into());
        }
        out.push((disk, path));
    }
    if out.is_empty() {
        bail!("no --target given: name the disk or image file to restore to");
    }
    Ok(out)
}
