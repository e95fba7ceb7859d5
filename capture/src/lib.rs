//! Capture: reads disks, partitions and image files into a restore point.
//!
//! Each SOURCE becomes a disk of the manifest. A disk with a partition table is captured
//! as one volume per partition plus "gap" volumes for every byte outside them (boot code,
//! the table itself); swap is recorded without contents; ext2/3/4 and XFS volumes store
//! only allocated blocks; anything else is read raw, with all-zero chunks stored as holes.
#![forbid(unsafe_code)]

pub mod claim;
pub mod firmware;
pub mod fs;
pub mod layout;
pub mod live;
pub mod pipeline;
pub mod ranges;
pub mod region;
pub mod source;
pub mod table;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bkimg_format::changemap::{self, ChangeMap};
use bkimg_format::manifest::{
    CompressionInfo, Content, Disk, Filesystem, Manifest, ParentRef, Tracking, Volume, VolumeRole,
};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::store::StoreWrite;
use bkimg_format::{Digest, FormatError};

pub use bkimg_format::progress::{Progress, Silent};

use crate::layout::PlannedVolume;
use crate::pipeline::{capture_volume, VolumeJob};
use crate::source::Source;

/// Default zstd level; see spec/format.md for the measurement behind it.
pub const DEFAULT_LEVEL: i32 = 3;

/// A new restore point's id and creation time (RFC 3339): the time to the second and six
/// random hex digits, so that ids sort by time and two captures in one second differ.
pub fn new_point_id() -> Result<(String, String)> {
    let now = time::OffsetDateTime::now_utc();
    let id = format!(
        "{}-{}",
        now.format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))?,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let created = now.format(&time::format_description::well_known::Rfc3339)?;
    Ok((id, created))
}

pub struct CaptureOptions {
    pub sources: Vec<PathBuf>,
    /// What to record as each disk's `source`, by position (None: the path read). A live
    /// capture reads a snapshot image and records the device it is an image of.
    pub source_names: Vec<Option<String>>,
    /// Change maps, one per source in order (None: read everything).
    pub changed_blocks: Vec<Option<ChangeSource>>,
    pub chunk_size: u32,
    pub level: i32,
    /// Store every byte (no filesystem allocation maps).
    pub raw: bool,
    pub workers: usize,
    pub id: String,
    pub created: String,
    pub host: String,
    pub tool: String,
    /// What the manifest says of the capture's consistency.
    pub consistency: claim::Consistency,
    /// Periodic verification of change tracking (spec/format.md §15.1): when a disk's
    /// change map could be used and the parent's run of changed-blocks captures has
    /// reached `verify_cbt_every - 1`, the disk is read whole instead (hash-diff) and the
    /// chunks the map missed are counted. 0: never.
    pub verify_cbt_every: u32,
}

/// Where a source's change map comes from.
pub enum ChangeSource {
    /// A change map file (`capture --changed-blocks FILE`).
    File(PathBuf),
    /// A map already in memory (a live capture builds it from the tracker's table);
    /// `label` names it in notes.
    Map { map: ChangeMap, label: String },
}

/// How each disk's incremental was done, for the user.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub source: String,
    /// "full", "hash-diff" or "changed-blocks".
    pub mode: String,
    pub bytes_read: u64,
    pub bytes_stored_new: u64,
    pub chunks_new: u64,
    /// Why a change map was given but not used (the disk was read whole instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// A periodic verification (spec/format.md §15.1): chunks of volumes read raw that
    /// differ from the parent although the change map did not list them (0: the tracker
    /// missed nothing there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed_chunks: Option<u64>,
}

pub struct CaptureResult {
    pub manifest: Manifest,
    pub reports: Vec<DiskReport>,
}

/// Captures all sources into one restore point and commits it. `parent` makes it an
/// incremental of that restore point.
pub fn capture(
    repo: &Repository,
    store: &dyn StoreWrite,
    parent: Option<&Point>,
    opts: &CaptureOptions,
    progress: &dyn Progress,
) -> Result<CaptureResult> {
    capture_checked(repo, store, parent, opts, progress, &|| Ok(()))
}

/// [`capture`], with a last check before the commit: if `before_commit` fails, nothing is
/// committed (a live capture checks that its snapshot stayed intact while it was read).
/// One more than the largest sequence of the restore points in `repo` (0 for those of
/// older writers; unreadable manifests are skipped: they are reported by list and verify).
pub fn next_sequence(repo: &Repository) -> Result<u64> {
    let (points, _) = repo.points()?;
    Ok(points
        .iter()
        .filter_map(|p| p.manifest.sequence)
        .max()
        .unwrap_or(0)
        + 1)
}

pub fn capture_checked(
    repo: &Repository,
    store: &dyn StoreWrite,
    parent: Option<&Point>,
    opts: &CaptureOptions,
    progress: &dyn Progress,
    before_commit: &dyn Fn() -> Result<()>,
) -> Result<CaptureResult> {
    if opts.sources.is_empty() {
        bail!("no SOURCE given: name at least one disk, partition or image file");
    }
    let chunk_size = parent.map_or(opts.chunk_size, |p| p.manifest.chunk_size);
    let sources = opts
        .sources
        .iter()
        .map(|p| Source::open(p))
        .collect::<Result<Vec<_>>>()?;
    let plans = sources
        .iter()
        .map(layout::plan)
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = sources.iter().map(|s| s.region.len()).sum();
    progress.begin("capture", total);
    // Tests stop a capture here, its repository open, to signal it.
    bkimg_format::testhook::pause("capture-reading");

    let mut disks = Vec::new();
    let mut reports = Vec::new();
    for (i, (source, plan)) in sources.iter().zip(plans).enumerate() {
        let name = format!("disk{i}");
        let parent_disk = parent.and_then(|p| p.manifest.disks.iter().find(|d| d.name == name));
        let recorded_source = opts
            .source_names
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| source.path.display().to_string());
        let mut verify: Option<ChangeMap> = None;
        let (map, use_map, fallback) = match opts.changed_blocks.get(i).and_then(|c| c.as_ref()) {
            Some(input) => {
                let (map, label) = match input {
                    ChangeSource::File(path) => {
                        (load_change_map(path, source)?, path.display().to_string())
                    }
                    ChangeSource::Map { map, label } => {
                        check_map_size(map, label, source)?;
                        (map.clone(), label.clone())
                    }
                };
                let why = map_unusable(&map, parent.is_some(), parent_disk);
                if let Some(why) = &why {
                    progress.note(&format!(
                        "change map {label}: {why}: falling back to hash-diff"
                    ));
                }
                let usable = parent_disk.is_some() && why.is_none();
                let run = parent_disk
                    .and_then(|d| d.tracking.as_ref())
                    .map_or(0, |t| t.changed_blocks_run);
                if usable && verify_due(run, opts.verify_cbt_every) {
                    let why = format!(
                        "periodic verification (--verify-cbt-every {}): the last {run} \
                         capture(s) of this disk used change maps",
                        opts.verify_cbt_every
                    );
                    progress.note(&format!(
                        "{recorded_source}: {why}: reading it whole (hash-diff) and checking \
                         the map {label} against what changed"
                    ));
                    verify = Some(map.clone());
                    (Some(map), false, Some(why))
                } else {
                    (Some(map), usable, why)
                }
            }
            None => (None, false, None),
        };
        let run = match use_map {
            true => parent_disk
                .and_then(|d| d.tracking.as_ref())
                .map_or(0, |t| t.changed_blocks_run)
                .saturating_add(1),
            false => 0,
        };
        let mode = match (use_map, parent_disk) {
            (true, _) => "changed-blocks",
            (false, Some(_)) => "hash-diff",
            (false, None) => "full",
        };
        let mut report = DiskReport {
            disk: name.clone(),
            source: recorded_source.clone(),
            mode: mode.to_string(),
            bytes_read: 0,
            bytes_stored_new: 0,
            chunks_new: 0,
            fallback,
            missed_chunks: verify.as_ref().map(|_| 0),
        };
        let mut volumes = Vec::new();
        for planned in &plan.volumes {
            let parent_volume = parent_disk.and_then(|d| {
                d.volumes.iter().find(|v| {
                    v.name == planned.name && v.offset == planned.offset && v.size == planned.size
                })
            });
            let volume = capture_one(
                repo,
                store,
                source,
                planned,
                parent_volume,
                map.as_ref().filter(|_| use_map),
                verify.as_ref(),
                chunk_size,
                opts,
                progress,
                &mut report,
            )
            .with_context(|| format!("capturing {} of {}", planned.name, source.path.display()))?;
            volumes.push(volume);
        }
        source.check_size_unchanged()?;
        disks.push(Disk {
            name,
            source: recorded_source.clone(),
            size: source.region.len(),
            logical_sector_size: source.logical_sector_size,
            table: plan.table.clone(),
            volumes,
            tracking: map.map(|m| Tracking {
                generation: m.generation_hex(),
                sequence: m.to_sequence,
                changed_blocks_run: run,
            }),
        });
        if let Some(n) = report.missed_chunks.filter(|&n| n > 0) {
            progress.note(&format!(
                "warning: {recorded_source}: {n} chunk(s) changed since the parent that its \
                 change map did not list: the change tracking missed writes (this restore \
                 point read the disk whole and is complete; check what writes the disk \
                 behind the tracker)"
            ));
        }
        reports.push(report);
    }

    let firmware = firmware::boot_entries(&bkimg_format::testhook::efivars_dir(), &disks);
    let manifest = Manifest {
        id: opts.id.clone(),
        created: opts.created.clone(),
        host: opts.host.clone(),
        tool: opts.tool.clone(),
        parent: parent.map(|p| ParentRef {
            id: p.manifest.id.clone(),
            manifest_sha256: p.manifest_sha256.to_hex(),
        }),
        chunk_size,
        compression: CompressionInfo {
            algorithm: "zstd".into(),
            level: opts.level,
        },
        disks,
        firmware,
        consistency: Some(opts.consistency.as_str().to_string()),
        sequence: Some(next_sequence(repo)?),
    };
    before_commit()?;
    store
        .commit_manifest(&manifest.id, &manifest.encode())
        .context("committing the restore point")?;
    Ok(CaptureResult { manifest, reports })
}

#[allow(clippy::too_many_arguments)]
fn capture_one(
    repo: &Repository,
    store: &dyn StoreWrite,
    source: &Source,
    planned: &PlannedVolume,
    parent_volume: Option<&Volume>,
    map: Option<&ChangeMap>,
    verify: Option<&ChangeMap>,
    chunk_size: u32,
    opts: &CaptureOptions,
    progress: &dyn Progress,
    report: &mut DiskReport,
) -> Result<Volume> {
    let region = source.region.sub(planned.offset, planned.size)?;
    let detected = if planned.role == VolumeRole::Gap {
        None
    } else {
        fs::detect(&region).context("probing the volume's filesystem")?
    };
    let filesystem = detected.as_ref().map(|info| Filesystem {
        fs_type: info.kind.name().to_string(),
        uuid: info.uuid.clone(),
        label: info.label.clone(),
    });
    let content = match detected.as_ref().filter(|i| i.kind == fs::FsKind::Swap) {
        Some(info) => {
            progress.advance(planned.size);
            Content::Swap {
                uuid: info.uuid.clone(),
                label: info.label.clone(),
                page_size: info.block_size.unwrap_or(4096),
            }
        }
        None => {
            let used = match (detected.as_ref(), opts.raw) {
                (Some(info), false) => fs::used_ranges(&region, info)?,
                _ => None,
            };
            let mode = if used.is_some() { "used-blocks" } else { "raw" };
            let parent_index = match parent_volume.map(|v| &v.content) {
                Some(Content::Data { index, .. }) => {
                    let id = Digest::from_hex(index).ok_or_else(|| {
                        FormatError::corrupt("parent manifest", format!("bad index id {index:?}"))
                    })?;
                    let reader = repo.index(&id)?;
                    (reader.header().chunk_size == chunk_size
                        && reader.header().volume_size == planned.size)
                        .then_some(reader)
                }
                _ => None,
            };
            let changed = match (map, &parent_index) {
                (Some(m), Some(_)) => Some(
                    m.byte_ranges()
                        .filter_map(|r| {
                            let s = r.start.max(planned.offset);
                            let e = r.end.min(planned.offset + planned.size);
                            (s < e).then(|| s - planned.offset..e - planned.offset)
                        })
                        .collect(),
                ),
                _ => None,
            };
            let verify_parent = match (verify, &parent_index, mode) {
                (Some(m), Some(p), "raw") => Some((m, p.header().id())),
                _ => None,
            };
            let job = VolumeJob {
                region,
                chunk_size,
                used,
                parent: parent_index,
                changed,
                level: opts.level,
                workers: opts.workers,
            };
            let (index, stats) = capture_volume(job, store, progress)?;
            if let Some((m, parent_id)) = verify_parent {
                let missed = missed_chunks(repo, &parent_id, &index, m, planned, chunk_size)
                    .with_context(|| format!("verifying the change map of {}", planned.name))?;
                *report.missed_chunks.get_or_insert(0) += missed;
            }
            report.bytes_read += stats.bytes_read;
            report.bytes_stored_new += stats.bytes_stored_new;
            report.chunks_new += stats.chunks_new;
            Content::Data {
                index: index.to_hex(),
                mode: mode.to_string(),
                bytes_read: stats.bytes_read,
                bytes_data: stats.bytes_data,
                bytes_stored_new: stats.bytes_stored_new,
            }
        }
    };
    Ok(Volume {
        name: planned.name.clone(),
        role: planned.role,
        partition: planned.partition,
        offset: planned.offset,
        size: planned.size,
        filesystem,
        content,
    })
}

/// Whether a capture whose parent ends a run of `run` changed-blocks captures must verify
/// (read whole) instead, with `--verify-cbt-every every` (0: never).
pub fn verify_due(run: u32, every: u32) -> bool {
    every > 0 && run.saturating_add(1) >= every
}

/// Chunks of a volume that differ between the parent's index and the new one although
/// no range of `map` touches them: writes the tracker missed. Only meaningful for a
/// volume read raw (a used-blocks capture zeroes free space, which changes chunks
/// without writes).
fn missed_chunks(
    repo: &Repository,
    parent: &Digest,
    new: &Digest,
    map: &ChangeMap,
    planned: &PlannedVolume,
    chunk_size: u32,
) -> Result<u64> {
    let old = repo.index(parent)?.read_all()?;
    let new = repo.index(new)?.read_all()?;
    let cs = u64::from(chunk_size);
    let (start, end) = (planned.offset, planned.offset + planned.size);
    let mut ranges: Vec<(u64, u64)> = map
        .byte_ranges()
        .map(|r| (r.start.max(start), r.end.min(end)))
        .filter(|(s, e)| s < e)
        .map(|(s, e)| (s - start, e - start))
        .collect();
    ranges.sort_unstable();
    let mut next = 0;
    let mut missed = 0;
    for (i, (a, b)) in old.iter().zip(&new).enumerate() {
        let (cs_start, cs_end) = (i as u64 * cs, (i as u64 + 1) * cs);
        while next < ranges.len() && ranges[next].1 <= cs_start {
            next += 1;
        }
        let listed = ranges.get(next).is_some_and(|&(s, _)| s < cs_end);
        if a != b && !listed {
            missed += 1;
        }
    }
    Ok(missed)
}

/// Reads a change map and checks it describes this source.
fn load_change_map(path: &std::path::Path, source: &Source) -> Result<ChangeMap> {
    use std::io::Read;
    let limit = changemap::HEADER_LEN as u64 + 16 * changemap::MAX_RANGES + 32;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read change map {}", path.display()))?;
    let map =
        ChangeMap::decode(&bytes).with_context(|| format!("change map {}", path.display()))?;
    check_map_size(&map, &path.display().to_string(), source)?;
    Ok(map)
}

fn check_map_size(map: &ChangeMap, label: &str, source: &Source) -> Result<()> {
    if map.device_size != source.region.len() {
        bail!(
            "change map {label} describes a {}-byte device but {} is {} bytes: wrong map for this source",
            map.device_size,
            source.path.display(),
            source.region.len()
        );
    }
    Ok(())
}

/// Why a change map may not replace reading (None: it may, or there is no parent to
/// read less than). It may only when the parent disk was captured at exactly the tracker
/// state the map starts from. Otherwise changes between the two could be missed, so
/// capture reads everything (and still records the map's end state, so the next
/// incremental can use its map).
fn map_unusable(map: &ChangeMap, has_parent: bool, parent_disk: Option<&Disk>) -> Option<String> {
    let why = match parent_disk.map(|d| &d.tracking) {
        None if !has_parent => return None, // a full capture: records the tracking state
        None => "the parent has no disk of this name".to_string(),
        Some(None) => "the parent recorded no tracking state".to_string(),
        Some(Some(t))
            if t.generation != map.generation_hex() || t.sequence != map.from_sequence =>
        {
            format!(
                "the map covers generation {} from snapshot {}, but the parent was taken at \
                 generation {} snapshot {}",
                map.generation_hex(),
                map.from_sequence,
                t.generation,
                t.sequence
            )
        }
        Some(Some(_)) => return None,
    };
    Some(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkimg_format::store::LocalDir;
    use std::io::{Seek, SeekFrom, Write};

    fn opts(image: &std::path::Path, id: &str, map: Option<ChangeMap>) -> CaptureOptions {
        CaptureOptions {
            sources: vec![image.to_path_buf()],
            source_names: vec![Some("/dev/vdb".into())],
            changed_blocks: vec![map.map(|map| ChangeSource::Map {
                map,
                label: "of the test tracker".into(),
            })],
            chunk_size: 64 << 10,
            level: 1,
            raw: true,
            workers: 2,
            id: id.into(),
            created: format!("2026-01-01T00:00:0{}Z", &id[1..]),
            host: "test".into(),
            tool: "test".into(),
            consistency: crate::claim::Consistency::Offline,
            verify_cbt_every: 0,
        }
    }

    fn map(generation: u8, from: u64, to: u64, ranges: Vec<(u64, u64)>) -> ChangeMap {
        ChangeMap {
            block_size: 65536,
            device_size: 4 << 20,
            generation: [generation; 16],
            from_sequence: from,
            to_sequence: to,
            ranges,
        }
    }

    /// A 4 MiB patterned image and a new repository beside it, in a temporary directory.
    fn image_and_repository() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Vec<u8>,
        LocalDir,
        Repository,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let root = dir.path().join("repo");
        let store = LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap();
        let repo = Repository::new(Box::new(LocalDir::open(&root).unwrap()));
        (dir, image, data, store, repo)
    }

    /// A live capture's inputs: a recorded source name, maps in memory, and a last check
    /// before the commit.
    #[test]
    fn recorded_names_maps_in_memory_and_the_commit_check() {
        let (_dir, image, _data, store, repo) = image_and_repository();

        // Full: the map only records where tracking stands.
        let full = capture(
            &repo,
            &store,
            None,
            &opts(&image, "p1", Some(map(7, 0, 1, vec![(0, 64)]))),
            &Silent,
        )
        .unwrap();
        let disk = &full.manifest.disks[0];
        assert_eq!(disk.source, "/dev/vdb");
        assert_eq!(full.reports[0].source, "/dev/vdb");
        assert_eq!(full.reports[0].mode, "full");
        assert_eq!(full.reports[0].fallback, None);
        let t = disk.tracking.as_ref().unwrap();
        assert_eq!(
            (t.generation.as_str(), t.sequence),
            ("07".repeat(16).as_str(), 1)
        );

        // Same generation, from the parent's sequence: only the named block is read.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.seek(SeekFrom::Start(3 * 65536)).unwrap();
        f.write_all(&[0xAA; 100]).unwrap();
        drop(f);
        let parent = repo.resolve("p1").unwrap();
        let inc = capture(
            &repo,
            &store,
            Some(&parent),
            &opts(&image, "p2", Some(map(7, 1, 2, vec![(3, 1)]))),
            &Silent,
        )
        .unwrap();
        assert_eq!(inc.reports[0].mode, "changed-blocks");
        assert_eq!(inc.reports[0].bytes_read, 65536);
        assert_eq!(inc.manifest.disks[0].tracking.as_ref().unwrap().sequence, 2);

        // Another generation: read whole, and the report says why.
        let parent = repo.resolve("p2").unwrap();
        let other = capture(
            &repo,
            &store,
            Some(&parent),
            &opts(&image, "p3", Some(map(8, 0, 1, vec![]))),
            &Silent,
        )
        .unwrap();
        assert_eq!(other.reports[0].mode, "hash-diff");
        assert!(other.reports[0]
            .fallback
            .as_deref()
            .unwrap()
            .contains("generation"));
        assert_eq!(
            other.manifest.disks[0]
                .tracking
                .as_ref()
                .unwrap()
                .generation,
            "08".repeat(16)
        );

        // A failing last check commits nothing.
        let parent = repo.resolve("p3").unwrap();
        let err = capture_checked(
            &repo,
            &store,
            Some(&parent),
            &opts(&image, "p4", None),
            &Silent,
            &|| bail!("snapshot failed"),
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("snapshot failed"));
        assert_eq!(repo.points().unwrap().0.len(), 3);
        assert!(repo.resolve("p4").is_err());

        // A map of another device size is refused.
        let mut wrong = map(8, 1, 2, vec![]);
        wrong.device_size = 8 << 20;
        assert!(capture(
            &repo,
            &store,
            None,
            &opts(&image, "p5", Some(wrong)),
            &Silent
        )
        .is_err());
    }

    #[test]
    fn verification_is_due_every_nth_capture() {
        assert!(!verify_due(0, 0));
        assert!(!verify_due(u32::MAX, 0));
        assert!(verify_due(0, 1));
        assert!(!verify_due(0, 2));
        assert!(verify_due(1, 2));
        assert!(verify_due(5, 3));
        assert!(verify_due(u32::MAX, 7));
    }

    /// --verify-cbt-every 3: the third capture that could use its map reads the disk
    /// whole, counts the chunk the (broken) tracker missed, and restarts the run.
    #[test]
    fn periodic_verification_reads_whole_and_counts_missed_chunks() {
        let (_dir, image, _data, store, repo) = image_and_repository();
        let write = |block: u64, byte: u8| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            f.seek(SeekFrom::Start(block * 65536)).unwrap();
            f.write_all(&[byte; 100]).unwrap();
        };
        let step = |n: u64, parent: Option<&str>| {
            let parent = parent.map(|p| repo.resolve(p).unwrap());
            let mut o = opts(
                &image,
                &format!("p{n}"),
                Some(map(7, n - 1, n, vec![(3, 1)])),
            );
            o.verify_cbt_every = 3;
            capture(&repo, &store, parent.as_ref(), &o, &Silent).unwrap()
        };
        let run = |r: &CaptureResult| {
            r.manifest.disks[0]
                .tracking
                .as_ref()
                .unwrap()
                .changed_blocks_run
        };

        let p1 = step(1, None);
        assert_eq!((p1.reports[0].mode.as_str(), run(&p1)), ("full", 0));
        write(3, 1);
        let p2 = step(2, Some("p1"));
        assert_eq!(
            (p2.reports[0].mode.as_str(), run(&p2)),
            ("changed-blocks", 1)
        );
        assert_eq!(p2.reports[0].missed_chunks, None);
        // Block 10 written behind the tracker's back: the map does not list it.
        write(3, 2);
        write(10, 3);
        let p3 = step(3, Some("p2"));
        assert_eq!(
            (p3.reports[0].mode.as_str(), run(&p3)),
            ("changed-blocks", 2)
        );
        write(3, 4);
        let p4 = step(4, Some("p3"));
        assert_eq!((p4.reports[0].mode.as_str(), run(&p4)), ("hash-diff", 0));
        assert!(p4.reports[0]
            .fallback
            .as_deref()
            .unwrap()
            .contains("periodic verification (--verify-cbt-every 3)"));
        assert_eq!(p4.reports[0].missed_chunks, Some(1));
        assert_eq!(p4.reports[0].bytes_read, 4 << 20);
        // The run restarts; a verification that finds nothing reports 0.
        let p5 = step(5, Some("p4"));
        assert_eq!(
            (p5.reports[0].mode.as_str(), run(&p5)),
            ("changed-blocks", 1)
        );
        let p6 = step(6, Some("p5"));
        assert_eq!(run(&p6), 2);
        let p7 = step(7, Some("p6"));
        assert_eq!((p7.reports[0].mode.as_str(), run(&p7)), ("hash-diff", 0));
        assert_eq!(p7.reports[0].missed_chunks, Some(0));
    }
}
