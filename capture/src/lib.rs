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
                (Some(map), usable, why)
            }
            None => (None, false, None),
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
            source: recorded_source,
            size: source.region.len(),
            logical_sector_size: source.logical_sector_size,
            table: plan.table.clone(),
            volumes,
            tracking: map.map(|m| Tracking {
                generation: m.generation_hex(),
                sequence: m.to_sequence,
            }),
        });
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

    /// A live capture's inputs: a recorded source name, maps in memory, and a last check
    /// before the commit.
    #[test]
    fn recorded_names_maps_in_memory_and_the_commit_check() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let root = dir.path().join("repo");
        let store = LocalDir::open_or_create(&root, "r", "2026-01-01T00:00:00Z").unwrap();
        let repo = Repository::new(Box::new(LocalDir::open(&root).unwrap()));

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
}
