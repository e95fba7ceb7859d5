//! What the standby wrote to a replica, as the journal keeps it: the identity of the
//! device or file ([`DeviceId`]) and a sample of its chunks ([`Sample`]), both taken after
//! an apply was flushed. Before the next incremental apply both are read again; if the
//! target is another device or file, or a sampled chunk reads otherwise, the replica may
//! not hold the point the journal says, and the apply restores it whole instead.
//!
//! The sample (at most three chunks a volume plus 16): the first two and the last
//! chunk of every volume of the disk, where partitioning tools and mounts write (partition
//! tables, boot sectors, superblocks and their backups), and one chunk in each sixteenth
//! of the disk at a place drawn from the point id, so successive points look at other
//! places. It finds a mounted or repartitioned replica and a swapped one, not every stray
//! write: `bkimg standby verify` reads all of it.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use bkimg_format::manifest::{Content, Disk};
use bkimg_format::protect::ChunkIds;
use bkimg_format::repo::{Point, Repository};
use bkimg_format::Digest;
use serde::{Deserialize, Serialize};

/// Chunks sampled over the whole disk, one in each 1/SPREAD of it.
const SPREAD: u64 = 16;

/// Recorded for a replica after each apply (journal version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The point the target held when this was taken.
    pub point: String,
    pub device: DeviceId,
    pub chunks: Vec<Sample>,
}

/// Which device or file a target is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceId {
    /// "block" or "file".
    pub kind: String,
    /// A block device's number ("MAJOR:MINOR"); a file's filesystem and inode
    /// ("DEV:INODE"). Device numbers may change when the machine restarts.
    pub number: String,
    /// What stays the same across restarts, when the kernel knows it: for a disk its WWID
    /// or serial number (a partition adds its number), a device-mapper or md UUID, a loop
    /// device's backing file; for a file its inode and birth time. Compared instead of
    /// `number` when both sides have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    pub size: u64,
}

/// One sampled chunk: where, how long, and the digest of what was read there
/// ([`Digest::of_chunk`]: all zeros read as the hole digest, as in an index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub offset: u64,
    pub length: u64,
    pub digest: String,
}

/// The identity of `target` now.
pub fn device_id(target: &Path) -> Result<DeviceId> {
    let file = File::open(target).with_context(|| format!("opening {}", target.display()))?;
    let m = file
        .metadata()
        .with_context(|| format!("reading {}", target.display()))?;
    if m.file_type().is_block_device() {
        let (major, minor) = (
            nix::sys::stat::major(m.rdev()),
            nix::sys::stat::minor(m.rdev()),
        );
        let size = {
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .with_context(|| format!("reading the size of {}", target.display()))?
        };
        return Ok(DeviceId {
            kind: "block".into(),
            number: format!("{major}:{minor}"),
            stable: block_stable_id(major, minor),
            size,
        });
    }
    Ok(DeviceId {
        kind: "file".into(),
        number: format!("{}:{}", m.dev(), m.ino()),
        stable: file_stable_id(&m),
        size: m.len(),
    })
}

/// Inode and birth time: the same file across restarts even if its filesystem's device
/// number changes (btrfs gives each mount a new one); None where there is no birth time.
fn file_stable_id(m: &std::fs::Metadata) -> Option<String> {
    let born = m.created().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("inode {} born {}", m.ino(), born.as_nanos()))
}

/// The stable identity of block device MAJOR:MINOR from sysfs, if the kernel has one.
fn block_stable_id(major: u64, minor: u64) -> Option<String> {
    let dev = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let (disk, part) = match read(&dev.join("partition")) {
        Some(n) => (dev.parent()?.to_path_buf(), Some(n)),
        None => (dev, None),
    };
    let id = [
        "wwid",
        "device/wwid",
        "device/serial",
        "serial",
        "dm/uuid",
        "md/uuid",
    ]
    .iter()
    .find_map(|f| read(&disk.join(f)).map(|v| format!("{f} {v}")))
    .or_else(|| {
        let backing = read(&disk.join("loop/backing_file"))?;
        let m = std::fs::metadata(&backing).ok()?;
        let offset = read(&disk.join("loop/offset")).unwrap_or_default();
        let limit = read(&disk.join("loop/sizelimit")).unwrap_or_default();
        Some(format!(
            "loop over {backing} ({}, {}:{}) offset {offset} sizelimit {limit}",
            file_stable_id(&m).unwrap_or_default(),
            m.dev(),
            m.ino()
        ))
    })?;
    Some(match part {
        Some(n) => format!("{id} partition {n}"),
        None => id,
    })
}

impl DeviceId {
    /// Why `now` is not the device or file this identity was taken of; None if it is.
    pub fn differs(&self, now: &DeviceId) -> Option<String> {
        if self.kind != now.kind {
            return Some(format!(
                "it was a {} and is now a {}",
                self.noun(),
                now.noun()
            ));
        }
        let same = match (&self.stable, &now.stable) {
            (Some(a), Some(b)) => a == b,
            _ => self.number == now.number,
        };
        if !same {
            let show = |d: &DeviceId| match &d.stable {
                Some(s) => format!("{} ({s})", d.number),
                None => d.number.clone(),
            };
            return Some(match self.kind.as_str() {
                "block" => format!(
                    "it is another device than the one the standby wrote (was {}, now {})",
                    show(self),
                    show(now)
                ),
                _ => format!(
                    "it is not the file the standby wrote (was {}, now {})",
                    show(self),
                    show(now)
                ),
            });
        }
        (self.size != now.size)
            .then(|| format!("its size changed from {} to {} bytes", self.size, now.size))
    }

    fn noun(&self) -> &str {
        match self.kind.as_str() {
            "block" => "block device",
            _ => "file",
        }
    }
}

/// The chunks to sample on `disk` of point `id` (offset, length), in disk order.
pub fn sample_places(id: &str, disk: &Disk, chunk_size: u32) -> Vec<(u64, u64)> {
    let cs = u64::from(chunk_size);
    let mut out = Vec::new();
    let entry = |v: &bkimg_format::manifest::Volume, e: u64| {
        let at = e * cs;
        (v.offset + at, cs.min(v.size - at))
    };
    for v in disk.volumes.iter().filter(|v| v.size > 0) {
        let n = v.size.div_ceil(cs);
        for e in [0, 1, n - 1] {
            if e < n {
                out.push(entry(v, e));
            }
        }
    }
    if disk.size > 0 {
        for k in 0..SPREAD {
            let d = Digest::of_bytes(format!("{id} sample {k}").as_bytes());
            let r = u64::from_le_bytes(d.0[..8].try_into().expect("8 bytes"));
            let lo = disk.size / SPREAD * k;
            let hi = if k + 1 == SPREAD {
                disk.size
            } else {
                disk.size / SPREAD * (k + 1)
            };
            if hi <= lo {
                continue;
            }
            let pos = lo + r % (hi - lo);
            if let Some(v) = disk
                .volumes
                .iter()
                .find(|v| v.offset <= pos && pos < v.offset + v.size)
            {
                out.push(entry(v, (pos - v.offset) / cs));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The id `ids` gives the chunk read at `offset` (samples are recorded by SHA-256; they are
/// compared with a point's index entries by the repository's own chunk ids).
fn read_digest(
    file: &File,
    target: &Path,
    offset: u64,
    length: u64,
    ids: &ChunkIds,
) -> Result<Digest> {
    let mut buf = vec![0u8; length as usize];
    file.read_exact_at(&mut buf, offset).with_context(|| {
        format!(
            "reading {length} bytes at byte {offset} of {}",
            target.display()
        )
    })?;
    Ok(ids.of(&buf))
}

/// Takes the identity and the sample of `target`, which holds `disk` of `point` (flushed).
pub fn take(point: &Point, disk: &Disk, target: &Path) -> Result<Written> {
    let device = device_id(target)?;
    let file = File::open(target).with_context(|| format!("opening {}", target.display()))?;
    let chunks = sample_places(&point.manifest.id, disk, point.manifest.chunk_size)
        .into_iter()
        .map(|(offset, length)| {
            Ok(Sample {
                offset,
                length,
                digest: read_digest(&file, target, offset, length, &ChunkIds::Sha256)?.to_hex(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Written {
        point: point.manifest.id.clone(),
        device,
        chunks,
    })
}

/// Why `target` may not hold `from`, the point `written` was taken of, as the standby left
/// it; None when it is the same device or file and every sampled chunk reads as recorded
/// or as `disk` of `new` has it (an apply of `new` cut short wrote it already).
pub fn changed(
    repo: &Repository,
    written: Option<&Written>,
    from: &str,
    new: &Point,
    disk: &Disk,
    target: &Path,
) -> Result<Option<String>> {
    let Some(w) = written else {
        return Ok(Some(
            "the journal records neither its identity nor sampled chunks (written by an \
             earlier bkimg)"
                .into(),
        ));
    };
    if w.point != from {
        return Ok(Some(format!(
            "the journal's sample of it is of {}, not of {from}",
            w.point
        )));
    }
    let now = match device_id(target) {
        Ok(d) => d,
        Err(e) => return Ok(Some(format!("{e:#}"))),
    };
    if let Some(why) = w.device.differs(&now) {
        return Ok(Some(why));
    }
    let file = File::open(target).with_context(|| format!("opening {}", target.display()))?;
    // Samples that read otherwise than recorded, in disk order (as recorded).
    let mut odd = Vec::new();
    for s in &w.chunks {
        match read_digest(&file, target, s.offset, s.length, &ChunkIds::Sha256) {
            Ok(have) if have.to_hex() == s.digest => {}
            Ok(_) => odd.push((
                s,
                read_digest(&file, target, s.offset, s.length, &repo.chunk_ids())?,
            )),
            Err(e) => return Ok(Some(format!("{e:#}"))),
        }
    }
    if odd.is_empty() {
        return Ok(None);
    }
    let places: Vec<&Sample> = odd.iter().map(|(s, _)| *s).collect();
    let new_has = new_chunks_at(repo, new, disk, &places)?;
    Ok(odd
        .iter()
        .zip(&new_has)
        .find(|((_, have), new)| **new != Some(*have))
        .map(|((s, _), _)| {
            format!(
                "the sampled chunk at byte {} ({} bytes) is not what the standby wrote there \
                 (something wrote to the replica; nothing may use it while the standby \
                 serves it)",
                s.offset, s.length
            )
        }))
}

/// The digests `disk` of `new` has for the chunks `samples` cover (in disk order), None
/// for a sample that is not exactly one of its data chunks. One pass over each index.
fn new_chunks_at(
    repo: &Repository,
    new: &Point,
    disk: &Disk,
    samples: &[&Sample],
) -> Result<Vec<Option<Digest>>> {
    let cs = u64::from(new.manifest.chunk_size);
    let mut out = vec![None; samples.len()];
    for v in &disk.volumes {
        let Content::Data { index, .. } = &v.content else {
            continue;
        };
        // (position in `samples`, index entry), entries ascending.
        let mut want: Vec<(usize, u64)> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| v.offset <= s.offset && s.offset < v.offset + v.size)
            .filter_map(|(i, s)| {
                let at = s.offset - v.offset;
                (at.is_multiple_of(cs) && cs.min(v.size - at) == s.length).then_some((i, at / cs))
            })
            .collect();
        if want.is_empty() {
            continue;
        }
        want.sort_unstable_by_key(|w| w.1);
        let index = Digest::from_hex(index).expect("validated");
        let mut entries = repo.index(&index)?;
        let (mut batch, mut n, mut next) = (Vec::new(), 0u64, 0usize);
        while next < want.len() {
            entries.next_batch(8192, &mut batch)?;
            if batch.is_empty() {
                break;
            }
            let end = n + batch.len() as u64;
            while let Some(&(i, e)) = want.get(next).filter(|(_, e)| *e < end) {
                out[i] = Some(batch[(e - n) as usize]);
                next += 1;
            }
            n = end;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: &str, number: &str, stable: Option<&str>, size: u64) -> DeviceId {
        DeviceId {
            kind: kind.into(),
            number: number.into(),
            stable: stable.map(Into::into),
            size,
        }
    }

    /// A stable identity wins over the device number (renumbered after a restart); without
    /// one on either side the number decides; the size and the kind always count.
    #[test]
    fn device_identity() {
        let sdb = id("block", "8:16", Some("wwid naa.1"), 1 << 30);
        assert_eq!(
            sdb.differs(&id("block", "8:32", Some("wwid naa.1"), 1 << 30)),
            None
        );
        let other = sdb
            .differs(&id("block", "8:16", Some("wwid naa.2"), 1 << 30))
            .unwrap();
        assert!(other.contains("another device"), "{other}");
        let bare = id("block", "8:16", None, 1 << 30);
        assert_eq!(bare.differs(&sdb), None);
        assert!(bare.differs(&id("block", "8:32", None, 1 << 30)).is_some());
        let grown = sdb.differs(&id("block", "8:16", Some("wwid naa.1"), 2 << 30));
        assert!(grown.unwrap().contains("size changed"));
        let file = id("file", "8:16", None, 1 << 30);
        assert!(sdb.differs(&file).unwrap().contains("is now a file"));
        let moved = id("file", "2049:12", Some("inode 12 born 1"), 5)
            .differs(&id("file", "2049:13", Some("inode 13 born 2"), 5))
            .unwrap();
        assert!(moved.contains("not the file"), "{moved}");
    }

    /// The real identity of a file: the same after a rewrite in place, another after a copy
    /// is renamed over it.
    #[test]
    fn file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.img");
        std::fs::write(&f, [1u8; 4096]).unwrap();
        let a = device_id(&f).unwrap();
        assert_eq!((a.kind.as_str(), a.size), ("file", 4096));
        std::fs::write(&f, [2u8; 4096]).unwrap();
        assert_eq!(a.differs(&device_id(&f).unwrap()), None);
        let c = dir.path().join("c.img");
        std::fs::copy(&f, &c).unwrap();
        std::fs::rename(&c, &f).unwrap();
        assert!(a.differs(&device_id(&f).unwrap()).is_some());
    }
}
