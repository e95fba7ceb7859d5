//! Pruning: deleting restore points a retention policy no longer keeps, and every index
//! and chunk that only they used (spec/format.md §7.5 and §11.4).
//!
//! The order of the steps keeps the repository consistent if the process dies at any
//! point: records for pruned parents are durable before any manifest goes; manifests go
//! (durably) before the data they name; data is deleted only if no remaining manifest
//! names it. What an interrupted prune leaves is garbage the next prune collects.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::record::PruneRecord;
use crate::repo::{Listing, Point, Repository};
use crate::store::StoreMaintain;
use crate::time::point_order;

/// Which restore points to keep. Every rule adds to the kept set; the newest point of
/// each machine is always kept (the next incremental capture names it as parent).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The newest N points.
    pub last: usize,
    /// The newest point of each of the newest N hours / days / weeks / months that have one.
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    /// Every point younger than this many seconds.
    pub within_secs: Option<u64>,
    /// These ids, whatever the rules say.
    pub pinned: Vec<String>,
}

impl Policy {
    /// True if no rule was given: pruning with it would keep only the newest points,
    /// which is never what a user means by leaving every option out.
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.within_secs.is_none()
            && self.pinned.is_empty()
    }
}

/// What the policy decided for one restore point.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub id: String,
    pub created: String,
    pub keep: bool,
    /// Why it is kept ("last", "daily", ...); empty when it is removed.
    pub reasons: Vec<&'static str>,
}

/// Applies `policy` to `points` (any order) at time `now` (Unix seconds). Points are
/// grouped by machine: the host name and the names of the captured disks, so one policy
/// keeps N points of each machine sharing a repository. Returned newest first.
pub fn decide(points: &[Point], policy: &Policy, now: i64) -> Vec<Decision> {
    let mut groups: BTreeMap<(String, Vec<String>), Vec<&Point>> = BTreeMap::new();
    for p in points {
        let mut disks: Vec<String> = p.manifest.disks.iter().map(|d| d.name.clone()).collect();
        disks.sort();
        groups
            .entry((p.manifest.host.clone(), disks))
            .or_default()
            .push(p);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        // Newest first: by sequence (§7.8), then time (to the nanosecond: several points
        // can share a second); ids break ties the same way every time.
        group.sort_by(|a, b| {
            b.manifest
                .sequence
                .unwrap_or(0)
                .cmp(&a.manifest.sequence.unwrap_or(0))
                .then_with(|| {
                    point_order(
                        &b.manifest.created,
                        &b.manifest.id,
                        &a.manifest.created,
                        &a.manifest.id,
                    )
                })
        });
        let mut buckets: [(usize, &str, HashSet<i64>); 4] = [
            (policy.hourly, "hourly", HashSet::new()),
            (policy.daily, "daily", HashSet::new()),
            (policy.weekly, "weekly", HashSet::new()),
            (policy.monthly, "monthly", HashSet::new()),
        ];
        for (rank, p) in group.iter().enumerate() {
            let mut reasons = Vec::new();
            let when = crate::time::parse(&p.manifest.created);
            if rank == 0 {
                reasons.push("newest");
            }
            if rank < policy.last {
                reasons.push("last");
            }
            if policy.pinned.contains(&p.manifest.id) {
                reasons.push("pinned");
            }
            match when {
                None => reasons.push("unknown time"),
                Some(t) => {
                    if let Some(w) = policy.within_secs {
                        if now.saturating_sub(t.unix_timestamp()) <= w as i64 {
                            reasons.push("within");
                        }
                    }
                    for (i, (limit, name, seen)) in buckets.iter_mut().enumerate() {
                        let key = bucket(t, i);
                        if seen.len() < *limit && seen.insert(key) {
                            reasons.push(name);
                        }
                    }
                }
            }
            out.push(Decision {
                id: p.manifest.id.clone(),
                created: p.manifest.created.clone(),
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    out.sort_by(|a, b| point_order(&b.created, &b.id, &a.created, &a.id));
    out
}

/// The hour, day, week (Monday to Sunday) or month (UTC) a time falls in, as a number.
fn bucket(at: time::OffsetDateTime, kind: usize) -> i64 {
    let day = i64::from(at.date().to_julian_day());
    match kind {
        0 => at.unix_timestamp().div_euclid(3600),
        1 => day,
        2 => day - i64::from(at.weekday().number_days_from_monday()),
        _ => i64::from(at.year()) * 12 + i64::from(u8::from(at.month())),
    }
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    pub records_written: usize,
    pub records_removed: usize,
    pub indexes_removed: usize,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
    pub chunks_kept: u64,
    pub bytes_kept: u64,
}

/// How many ancestors of `p` the listing holds (0 for a full point), memoized; walks
/// iteratively, a chain may be long.
fn depth_of<'a>(
    p: &'a Point,
    by_id: &HashMap<&str, &'a Point>,
    memo: &mut HashMap<&'a str, usize>,
) -> usize {
    let mut chain: Vec<&'a Point> = Vec::new();
    let mut next = Some(p);
    let mut base = None;
    while let Some(q) = next {
        if let Some(&d) = memo.get(q.manifest.id.as_str()) {
            base = Some(d);
            break;
        }
        chain.push(q);
        if chain.len() > by_id.len() {
            break;
        }
        next = q
            .manifest
            .parent
            .as_ref()
            .and_then(|l| by_id.get(l.id.as_str()))
            .copied();
    }
    for (d, q) in (base.map_or(0, |b| b + 1)..).zip(chain.iter().rev()) {
        memo.insert(q.manifest.id.as_str(), d);
    }
    memo.get(p.manifest.id.as_str()).copied().unwrap_or(0)
}

/// Deletes the restore points `remove` names (ids of points in `repo`) and everything
/// only they used. `store` is the same store `repo` reads, opened so that nobody else
/// writes meanwhile; `listing` is `repo.points()`, read under that lock. `now` (RFC 3339)
/// dates the prune records.
pub fn prune(
    repo: &Repository,
    store: &dyn StoreMaintain,
    listing: &Listing,
    remove: &HashSet<String>,
    dry_run: bool,
    now: &str,
) -> Result<PruneReport> {
    let (points, damaged) = listing;
    if let Some((id, e)) = damaged.first() {
        // Its manifest cannot say which data it uses: deleting anything could destroy it.
        return Err(FormatError::corrupt(
            format!("restore point {id}"),
            format!(
                "{}; prune deletes nothing while a manifest cannot be read (check with \
                 `bkimg verify`, then move the damaged manifest out of points/)",
                e.full_message()
            ),
        ));
    }
    let by_id: HashMap<&str, &Point> = points.iter().map(|p| (p.manifest.id.as_str(), p)).collect();
    for id in remove {
        if !by_id.contains_key(id.as_str()) {
            return Err(FormatError::missing(format!("restore point {id:?}")));
        }
    }
    let (gone, kept): (Vec<&Point>, Vec<&Point>) =
        points.iter().partition(|p| remove.contains(&p.manifest.id));
    let mut report = PruneReport {
        dry_run,
        kept: kept.iter().map(|p| p.manifest.id.clone()).collect(),
        removed: gone.iter().map(|p| p.manifest.id.clone()).collect(),
        ..PruneReport::default()
    };

    // Every kept chain must be sound before anything goes; a kept point whose parent goes
    // gets a record for it.
    // One pass over the links (a walk per point would read a long chain's manifests once
    // per point).
    let mut records: Vec<PruneRecord> = Vec::new();
    for p in &kept {
        let Some(link) = &p.manifest.parent else {
            continue;
        };
        match by_id.get(link.id.as_str()) {
            Some(parent) if parent.manifest_sha256.to_hex() != link.manifest_sha256 => {
                return Err(FormatError::corrupt(
                    format!("restore point {}", link.id),
                    format!(
                        "its manifest differs from the one its child {} recorded (changed or \
                         replaced); prune deletes nothing while a chain is broken",
                        p.manifest.id
                    ),
                ));
            }
            Some(parent) => {
                if remove.contains(&link.id) {
                    records.push(PruneRecord {
                        id: link.id.clone(),
                        manifest_sha256: parent.manifest_sha256.to_hex(),
                        pruned: now.to_string(),
                    });
                }
            }
            // Pruned earlier: its record must be there and fit (else this names the fault).
            None => {
                repo.ancestors(p)?;
            }
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    records.dedup_by(|a, b| a.id == b.id);
    report.records_written = records.len();

    if !dry_run {
        for r in &records {
            store.put_prune_record(&r.id, &r.encode())?;
        }
        // Children before their parents: stopped between two deletions, every manifest
        // left still has its parent, or a record for it.
        let mut depth: HashMap<&str, usize> = HashMap::new();
        let mut order = gone.clone();
        for p in &order {
            depth_of(p, &by_id, &mut depth);
        }
        order.sort_by_key(|p| std::cmp::Reverse(depth.get(p.manifest.id.as_str()).copied()));
        for p in &order {
            store.delete_manifest(&p.manifest.id)?;
        }
        // Tests kill a prune here, between the manifests and the data.
        crate::testhook::pause("prune-manifests-deleted");
    }

    // Mark: what the kept points use.
    let mut used_indexes: HashSet<Digest> = HashSet::new();
    let mut entries: u64 = 0;
    for p in &kept {
        let chunk = u64::from(p.manifest.chunk_size.max(1));
        for (_, volume, index) in p.manifest.indexes() {
            if let Some(index) = index {
                if used_indexes.insert(index) {
                    entries = entries.saturating_add(volume.size.div_ceil(chunk));
                }
            }
        }
    }
    let mut used = DigestFilter::with_capacity(entries, now);
    let mut batch = Vec::new();
    for index in &used_indexes {
        let mut reader = repo.index(index)?;
        while {
            reader.next_batch(4096, &mut batch)?;
            !batch.is_empty()
        } {
            for d in batch.iter().filter(|d| !d.is_hole()) {
                used.insert(d);
            }
        }
    }

    // Sweep.
    for index in store.list_indexes()? {
        if !used_indexes.contains(&index) {
            report.indexes_removed += 1;
            if !dry_run {
                store.delete_index(&index)?;
            }
        }
    }
    let mut doomed = Vec::new();
    store.scan_chunks(&mut |chunks| {
        doomed.clear();
        for (d, len) in chunks {
            if used.contains(d) {
                report.chunks_kept += 1;
                report.bytes_kept += len;
            } else {
                report.chunks_removed += 1;
                report.bytes_freed += len;
                doomed.push(*d);
            }
        }
        if !dry_run && !doomed.is_empty() {
            store.delete_chunks(&doomed)?;
        }
        Ok(())
    })?;

    // Records no remaining point needs.
    let needed: HashSet<&str> = kept
        .iter()
        .filter_map(|p| p.manifest.parent.as_ref().map(|l| l.id.as_str()))
        .filter(|id| !by_id.contains_key(id) || remove.contains(*id))
        .collect();
    for id in store.list_prune_records()? {
        if !needed.contains(id.as_str()) {
            report.records_removed += 1;
            if !dry_run {
                store.delete_prune_record(&id)?;
            }
        }
    }
    Ok(report)
}

/// A Bloom filter of chunk digests: "not in it" is certain, "in it" may be wrong with a
/// small probability, which only keeps an unused chunk until the next prune (each prune
/// salts the filter differently). Its size is bounded (64 MiB), so memory stays bounded
/// whatever the repository's size; more chunks than it was sized for only raise the rate
/// of unused chunks kept.
struct DigestFilter {
    bits: Vec<u64>,
    salt: [u64; 2],
}

const FILTER_MAX_BYTES: u64 = 64 << 20;
const FILTER_HASHES: u64 = 8;

impl DigestFilter {
    fn with_capacity(entries: u64, salt: &str) -> DigestFilter {
        // 16 bits per entry: about 0.06 % false positives with 8 hashes.
        let bytes = (entries.saturating_mul(2)).clamp(1 << 16, FILTER_MAX_BYTES);
        let s = Digest::of_bytes(salt.as_bytes()).0;
        DigestFilter {
            bits: vec![0; (bytes / 8) as usize],
            salt: [
                u64::from_le_bytes(s[0..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(s[8..16].try_into().expect("8 bytes")),
            ],
        }
    }

    /// Bit positions by double hashing; SHA-256 digests are uniform already.
    fn positions(&self, d: &Digest) -> impl Iterator<Item = usize> {
        let word = |i: usize| u64::from_le_bytes(d.0[i..i + 8].try_into().expect("8 bytes"));
        let h1 = word(0) ^ self.salt[0];
        let h2 = (word(8) ^ self.salt[1]) | 1;
        let n = self.bits.len() as u64 * 64;
        (0..FILTER_HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % n) as usize)
    }

    fn insert(&mut self, d: &Digest) {
        let pos: Vec<usize> = self.positions(d).collect();
        for p in pos {
            self.bits[p / 64] |= 1 << (p % 64);
        }
    }

    fn contains(&self, d: &Digest) -> bool {
        self.positions(d)
            .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_start_on_monday() {
        let mon = crate::time::parse("2026-11-16T00:00:00Z").unwrap();
        let sun = crate::time::parse("2026-11-22T23:59:59Z").unwrap();
        let next = crate::time::parse("2026-11-23T00:00:00Z").unwrap();
        assert_eq!(bucket(mon, 2), bucket(sun, 2));
        assert_ne!(bucket(sun, 2), bucket(next, 2));
        assert_ne!(
            bucket(crate::time::parse("2026-10-31T23:00:00Z").unwrap(), 3),
            bucket(crate::time::parse("2026-11-01T00:00:00Z").unwrap(), 3)
        );
    }

    fn point(id: &str, created: &str, host: &str) -> Point {
        Point {
            manifest: crate::manifest::Manifest {
                id: id.into(),
                created: created.into(),
                host: host.into(),
                tool: "bkimg test".into(),
                parent: None,
                chunk_size: 1 << 18,
                compression: crate::manifest::CompressionInfo {
                    algorithm: "zstd".into(),
                    level: 3,
                },
                disks: Vec::new(),
                firmware: None,
                consistency: None,
                sequence: None,
            },
            manifest_sha256: Digest::of_bytes(id.as_bytes()),
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn calendar_rules_keep_the_newest_point_of_each_bucket() {
        // Two points a day for 10 days (Nov 12 to 21, 2026), at 06:00 and 18:00 UTC.
        let mut points = Vec::new();
        for day in 12..=21 {
            for hour in [6, 18] {
                let id = format!("d{day}h{hour}");
                points.push(point(&id, &format!("2026-11-{day}T{hour:02}:00:00Z"), "a"));
            }
        }
        let now = crate::time::epoch_seconds("2026-11-21T20:00:00Z").unwrap();
        let daily = Policy {
            daily: 3,
            ..Policy::default()
        };
        assert_eq!(
            kept(&decide(&points, &daily, now)),
            ["d21h18", "d20h18", "d19h18"]
        );
        // Weeks start on Monday: Nov 16-21 and Nov 12-15 (Thursday to Sunday).
        let weekly = Policy {
            weekly: 5,
            ..Policy::default()
        };
        assert_eq!(kept(&decide(&points, &weekly, now)), ["d21h18", "d15h18"]);
        let within = Policy {
            within_secs: Some(26 * 3600),
            last: 1,
            ..Policy::default()
        };
        let d = decide(&points, &within, now);
        assert_eq!(kept(&d), ["d21h18", "d21h6", "d20h18"]);
        assert_eq!(d[0].reasons, ["newest", "last", "within"]);
        let monthly = Policy {
            monthly: 2,
            ..Policy::default()
        };
        assert_eq!(kept(&decide(&points, &monthly, now)), ["d21h18"]);
    }

    #[test]
    fn points_within_one_second_are_ordered_by_their_fraction() {
        // The id suffix is random: "x-b" sorts after "x-a" but was captured first.
        let points = vec![
            point("x-b", "2026-11-21T18:37:30.43Z", "h"),
            point("x-a", "2026-11-21T18:37:30.98Z", "h"),
        ];
        let last = Policy {
            last: 1,
            ..Policy::default()
        };
        assert_eq!(kept(&decide(&points, &last, 0)), ["x-a"]);
    }

    #[test]
    fn each_machine_keeps_its_own_points_and_unknown_times_are_kept() {
        let points = vec![
            point("a1", "2026-11-20T00:00:00Z", "a"),
            point("a2", "2026-11-21T00:00:00Z", "a"),
            point("b1", "2026-11-19T00:00:00Z", "b"),
            point("b2", "2026-11-19T01:00:00Z", "b"),
            point("c1", "yesterday", "a"),
        ];
        let last = Policy {
            last: 1,
            ..Policy::default()
        };
        let d = decide(&points, &last, 0);
        let mut k = kept(&d);
        k.sort();
        assert_eq!(k, ["a2", "b2", "c1"]);
        assert!(d
            .iter()
            .any(|x| x.id == "c1" && x.reasons.contains(&"unknown time")));
    }

    #[test]
    fn filter_has_no_false_negatives() {
        let mut f = DigestFilter::with_capacity(10_000, "salt");
        let ds: Vec<Digest> = (0..10_000u32)
            .map(|i| Digest::of_bytes(&i.to_le_bytes()))
            .collect();
        for d in &ds {
            f.insert(d);
        }
        assert!(ds.iter().all(|d| f.contains(d)));
        let false_pos = (10_000..110_000u32)
            .filter(|i| f.contains(&Digest::of_bytes(&i.to_le_bytes())))
            .count();
        assert!(false_pos < 500, "{false_pos} false positives in 100000");
    }
}
