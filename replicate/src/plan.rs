//! Which restore points a replication run ships, in which order: the same for every kind
//! of target.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use bkimg_format::repo::{Point, Repository};
use bkimg_format::FormatError;

/// Restore points whose manifests cannot be read, with why.
pub type Damaged = Vec<(String, FormatError)>;

/// The restore points to ship: all of `src`'s (`ids` empty) or those `ids` name with
/// their ancestors; each after its parent, with every parent link's manifest digest
/// checked (a broken chain is not shipped). Also returns the points whose manifests
/// cannot be read; callers decide whether that stops them.
pub fn points_to_ship(src: &Repository, ids: &[String]) -> Result<(Vec<Point>, Damaged)> {
    let (all, damaged) = src.points()?;
    let chosen = if ids.is_empty() {
        check_links(src, &all)?;
        all
    } else {
        let mut seen = HashSet::new();
        let mut chosen = Vec::new();
        for id in ids {
            let p = src.resolve(id)?;
            if seen.contains(&p.manifest.id) {
                continue;
            }
            let ancestors = src
                .ancestors(&p)
                .with_context(|| format!("the ancestors of restore point {}", p.manifest.id))?;
            for a in ancestors.into_iter().rev().chain(std::iter::once(p)) {
                if seen.insert(a.manifest.id.clone()) {
                    chosen.push(a);
                }
            }
        }
        chosen
    };
    Ok((parents_first(chosen), damaged))
}

/// Checks every parent link among `points` (all of a repository) in one pass; a point
/// whose parent is not among them gets the full walk, which names what is missing.
fn check_links(src: &Repository, points: &[Point]) -> Result<()> {
    let by_id: HashMap<&str, &Point> = points.iter().map(|p| (p.manifest.id.as_str(), p)).collect();
    for p in points {
        let Some(link) = &p.manifest.parent else {
            continue;
        };
        match by_id.get(link.id.as_str()) {
            Some(parent) if parent.manifest_sha256.to_hex() == link.manifest_sha256 => {}
            Some(_) => {
                return Err(FormatError::corrupt(
                    format!("restore point {}", link.id),
                    "its manifest differs from the one its child recorded (changed or replaced)",
                ))
                .with_context(|| format!("the ancestors of restore point {}", p.manifest.id));
            }
            None => {
                src.ancestors(p)
                    .with_context(|| format!("the ancestors of restore point {}", p.manifest.id))?;
            }
        }
    }
    Ok(())
}

/// Orders `points` so that each comes after its parent (when the parent is among them).
fn parents_first(points: Vec<Point>) -> Vec<Point> {
    let index: HashMap<&str, usize> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (p.manifest.id.as_str(), i))
        .collect();
    let mut placed = vec![false; points.len()];
    let mut order = Vec::with_capacity(points.len());
    for i in 0..points.len() {
        // Walk up to the first placed (or absent) ancestor, then place the walk top-down.
        let mut chain = Vec::new();
        let mut at = Some(i);
        while let Some(k) = at.filter(|&k| !placed[k]) {
            placed[k] = true;
            chain.push(k);
            at = points[k]
                .manifest
                .parent
                .as_ref()
                .and_then(|l| index.get(l.id.as_str()).copied());
        }
        order.extend(chain.into_iter().rev());
    }
    let mut slots: Vec<Option<Point>> = points.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|k| slots[k].take().expect("each point placed once"))
        .collect()
}
