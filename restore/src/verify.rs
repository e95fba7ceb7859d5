//! Verification: every manifest, parent link, index and chunk a restore point needs is
//! read and checked. Problems are collected, not fatal, so one run names all damage.

use std::collections::HashSet;

use bkimg_capture::Progress;
use bkimg_format::manifest::Content;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::{Digest, FormatError};
use serde::Serialize;

/// Digests checked recently; cleared when full so memory stays bounded (a chunk shared by
/// many restore points may then be checked more than once, never less).
const SEEN_LIMIT: usize = 1 << 20;

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

/// Verifies `ids` (all restore points when empty).
pub fn verify(
    repo: &Repository,
    ids: &[String],
    progress: &dyn Progress,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut points = Vec::new();
    if ids.is_empty() {
        let (good, bad) = repo.points()?;
        for (id, e) in bad {
            report
                .problems
                .push(problem(&id, None, None, None, None, &e));
        }
        points = good;
    } else {
        for id in ids {
            match repo.resolve(id) {
                Ok(p) => points.push(p),
                Err(e @ FormatError::Missing { .. }) => return Err(e.into()),
                Err(e) => report
                    .problems
                    .push(problem(id, None, None, None, None, &e)),
            }
        }
    }
    let total: u64 = points
        .iter()
        .flat_map(|p| p.manifest.disks.iter().flat_map(|d| &d.volumes))
        .map(|v| v.size)
        .sum();
    progress.begin("verify", total);
    for point in &points {
        report.points.push(point.manifest.id.clone());
        verify_point(repo, point, &mut seen, &mut report, progress);
    }
    Ok(report)
}

fn verify_point(
    repo: &Repository,
    point: &Point,
    seen: &mut HashSet<Digest>,
    report: &mut VerifyReport,
    progress: &dyn Progress,
) {
    let id = &point.manifest.id;
    if let Err(e) = repo.ancestors(point) {
        report
            .problems
            .push(problem(id, None, None, None, None, &e));
    }
    let (mut blob, mut plain, mut batch) = (Vec::new(), Vec::new(), Vec::new());
    for (disk, volume, index) in point.manifest.indexes() {
        let at = |offset, chunk: Option<&Digest>, e: &FormatError| {
            problem(id, Some(&disk.name), Some(&volume.name), offset, chunk, e)
        };
        let Content::Data {
            index: index_hex, ..
        } = &volume.content
        else {
            progress.advance(volume.size);
            continue;
        };
        let Some(index) = index else {
            let e = FormatError::corrupt("manifest", format!("bad index id {index_hex:?}"));
            report.problems.push(at(None, None, &e));
            continue;
        };
        let mut entries = match repo.index(&index) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(at(None, None, &e));
                progress.advance(volume.size);
                continue;
            }
        };
        let h = *entries.header();
        if h.volume_size != volume.size || h.chunk_size != point.manifest.chunk_size {
            let e = FormatError::corrupt(
                format!("volume index {index}"),
                "its size or chunk size differs from the manifest",
            );
            report.problems.push(at(None, None, &e));
        }
        let mut entry = 0u64;
        loop {
            if let Err(e) = entries.next_batch(4096, &mut batch) {
                report.problems.push(at(None, None, &e));
                break;
            }
            if batch.is_empty() {
                break;
            }
            for d in &batch {
                let offset = entry * u64::from(h.chunk_size);
                let len = u64::from(h.chunk_len(entry.min(h.entry_count() - 1)));
                entry += 1;
                progress.advance(len);
                if d.is_hole() || seen.contains(d) {
                    continue;
                }
                match repo.chunk(d, &mut blob, &mut plain) {
                    Ok(()) if plain.len() as u64 == len => {
                        report.chunks_checked += 1;
                        report.bytes_checked += len;
                        if seen.len() >= SEEN_LIMIT {
                            seen.clear();
                        }
                        seen.insert(*d);
                    }
                    Ok(()) => {
                        let e = FormatError::corrupt(
                            format!("chunk {d}"),
                            format!("{} bytes where the index needs {len}", plain.len()),
                        );
                        report.problems.push(at(Some(offset), Some(d), &e));
                    }
                    Err(e) => report.problems.push(at(Some(offset), Some(d), &e)),
                }
            }
        }
    }
}

fn problem(
    point: &str,
    disk: Option<&str>,
    volume: Option<&str>,
    offset: Option<u64>,
    chunk: Option<&Digest>,
    e: &FormatError,
) -> Problem {
    Problem {
        point: point.to_string(),
        disk: disk.map(str::to_string),
        volume: volume.map(str::to_string),
        offset,
        chunk: chunk.map(Digest::to_hex),
        error: e.full_message(),
    }
}
