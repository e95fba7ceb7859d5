//! What ties a saved tracker state to its device (spec/kmod-uapi.md §8.1): the device's
//! identity as the kernel (and udev) name it, and digests of a few regions of its content
//! that change whenever the device is written behind the tracker's back in practice (the
//! partition table, the start of every partition, where filesystems keep their
//! superblocks and mount counts). Restoring compares both before trusting the table.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::device::DevNum;
use crate::error::{KmodError, Result};

/// Bytes hashed at each place: the first MiB of a disk holds its partition table and boot
/// code, the first MiB of a filesystem its superblock (ext2/3/4 at 1024, XFS at 0 with the
/// first allocation group's headers).
pub const SPAN: u64 = 1 << 20;
/// The identity text's limit.
pub const MAX_IDENTITY_LEN: usize = 4096;
/// The region list's limit (the first and last MiB, and one per partition).
pub const MAX_REGIONS: usize = 1024;
/// A region's largest length.
pub const MAX_REGION_LEN: u64 = 16 << 20;
/// Bytes of one region record in the file: offset, length, SHA-256.
pub const REGION_RECORD: usize = 48;

/// A byte range of the device and the SHA-256 of its content when saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// A device's identity and content fingerprint, as recorded at save.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// `(key, value)`, ascending by key, keys unique.
    pub identity: Vec<(String, String)>,
    /// Ascending by offset.
    pub regions: Vec<Region>,
}

/// Whether `key` is a valid identity key: 1 to 32 of `a-z`, `0-9`, `_`.
pub fn valid_key(key: &str) -> bool {
    (1..=32).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `value` is a valid identity value: non-empty, no control characters.
pub fn valid_value(value: &str) -> bool {
    !value.is_empty() && !value.chars().any(char::is_control)
}

/// The identity as it is stored: `key=value\n` for each entry.
pub fn identity_text(identity: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in identity {
        let _ = writeln!(s, "{k}={v}");
    }
    s
}

/// Parses a stored identity; the reason when it is not valid.
pub fn parse_identity(bytes: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the identity is not UTF-8".to_string())?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the identity does not end with a newline".into());
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("identity line {line:?} is not KEY=VALUE"))?;
        if !valid_key(k) || !valid_value(v) {
            return Err(format!("identity line {line:?} is not KEY=VALUE"));
        }
        if out.last().is_some_and(|(last, _)| last.as_str() >= k) {
            return Err(format!("identity key {k:?} is out of order or repeated"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// One trimmed sysfs (or udev) value, if present and usable.
fn attr(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    valid_value(t).then(|| t.to_string())
}

/// A device's identity from its sysfs directory (`/sys/dev/block/MAJ:MIN`) and, where
/// udev keeps its database, `udev_data` (`/run/udev/data/bMAJ:MIN`): worldwide name and
/// serial number (SCSI, NVMe, virtio), device-mapper and md UUIDs, a loop device's backing
/// file; for a partition, its number and start, its GPT unique GUID (from udev) and its
/// disk's worldwide name and serial.
pub fn identity_of(sysfs: &Path, udev_data: Option<&Path>) -> Vec<(String, String)> {
    let mut id = Vec::new();
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            id.push((k.to_string(), v));
        }
    };
    let disk_ids = |dir: &Path| {
        (
            attr(&dir.join("wwid")).or_else(|| attr(&dir.join("device/wwid"))),
            attr(&dir.join("serial")).or_else(|| attr(&dir.join("device/serial"))),
        )
    };
    let is_partition = sysfs.join("partition").exists();
    if is_partition {
        let (wwid, serial) = disk_ids(&sysfs.join(".."));
        push("disk_serial", serial);
        push("disk_wwid", wwid);
    }
    push("dm_uuid", attr(&sysfs.join("dm/uuid")));
    push("loop_backing_file", attr(&sysfs.join("loop/backing_file")));
    push("md_uuid", attr(&sysfs.join("md/uuid")));
    if is_partition {
        push("partition", attr(&sysfs.join("partition")));
        let partuuid = udev_data
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("E:ID_PART_ENTRY_UUID="))
                    .map(|v| v.trim().to_ascii_lowercase())
            })
            .filter(|v| valid_value(v));
        push("partuuid", partuuid);
        push("start", attr(&sysfs.join("start")));
    } else {
        let (wwid, serial) = disk_ids(sysfs);
        push("serial", serial);
        push("wwid", wwid);
    }
    id.sort();
    id
}

/// The partitions of the device at `sysfs` as `(start, size)` in bytes, by start.
pub fn partitions_of(sysfs: &Path) -> Vec<(u64, u64)> {
    let mut parts: Vec<(u64, u64)> = std::fs::read_dir(sysfs)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| {
            let n = |f: &str| attr(&e.path().join(f))?.parse::<u64>().ok();
            Some((n("start")? * 512, n("size")? * 512))
        })
        .collect();
    parts.sort();
    parts
}

/// The regions to fingerprint: the first and last [`SPAN`] of the device and the first
/// [`SPAN`] of every partition (clipped to it), each once, by offset.
pub fn plan_regions(device_size: u64, partitions: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut r = vec![(0, SPAN.min(device_size))];
    if device_size > SPAN {
        // Not overlapping the first.
        let len = SPAN.min(device_size - SPAN);
        r.push((device_size - len, len));
    }
    for &(start, size) in partitions {
        let len = SPAN.min(size).min(device_size.saturating_sub(start));
        if len > 0 {
            r.push((start, len));
        }
    }
    r.retain(|&(_, len)| len > 0);
    r.sort();
    r.dedup_by_key(|x| x.0);
    r.truncate(MAX_REGIONS);
    r
}

/// SHA-256 of `len` bytes of `dev` at `offset`. The buffer is 4 KiB-aligned and every
/// read a multiple of 512 bytes at a multiple of 512 when `offset` and `len` are, so
/// `dev` may be opened with O_DIRECT.
pub fn hash_range(
    dev: &mut (impl Read + Seek),
    offset: u64,
    len: u64,
) -> std::io::Result<[u8; 32]> {
    const BUF: usize = 64 << 10;
    dev.seek(SeekFrom::Start(offset))?;
    let mut h = Sha256::new();
    let mut backing = vec![0u8; BUF + 4096];
    let at = backing.as_ptr().align_offset(4096).min(4096);
    let buf = &mut backing[at..at + BUF];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        dev.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().into())
}

impl Binding {
    /// Fingerprints `regions` of `dev` and records `identity`.
    pub fn compute(
        identity: Vec<(String, String)>,
        dev: &mut (impl Read + Seek),
        regions: &[(u64, u64)],
    ) -> std::io::Result<Binding> {
        let regions = regions
            .iter()
            .map(|&(offset, len)| {
                Ok(Region {
                    offset,
                    len,
                    sha256: hash_range(dev, offset, len)?,
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Binding { identity, regions })
    }

    /// The binding of block device `dev` now (read from its node under /dev).
    pub fn of_device(dev: DevNum) -> Result<Binding> {
        let sysfs = dev.sysfs();
        let size = dev.sectors()? * 512;
        let identity = identity_of(&sysfs, Some(&udev_data(dev)));
        let regions = plan_regions(size, &partitions_of(&sysfs));
        let (path, mut file) = open_device(dev)?;
        Binding::compute(identity, &mut file, &regions)
            .map_err(|e| KmodError::io(format!("cannot fingerprint {}", path.display()), e))
    }

    /// What differs between this saved binding and the device as it is now (`identity`
    /// now, its content read from `dev`), in words; None when nothing does. `partitions`
    /// (start, size in bytes) only name the regions in the answer.
    pub fn mismatch(
        &self,
        identity: &[(String, String)],
        dev: &mut (impl Read + Seek),
        device_size: u64,
        partitions: &[(u64, u64)],
    ) -> std::io::Result<Option<String>> {
        for (k, saved) in &self.identity {
            match identity.iter().find(|(key, _)| key == k) {
                None => {
                    return Ok(Some(format!(
                        "its {k} was {saved:?} when saved and cannot be read now"
                    )))
                }
                Some((_, now)) if now != saved => {
                    return Ok(Some(format!(
                        "its {k} is {now:?}, not {saved:?} as when saved (another device)"
                    )))
                }
                Some(_) => {}
            }
        }
        for r in &self.regions {
            if hash_range(dev, r.offset, r.len)? != r.sha256 {
                return Ok(Some(format!(
                    "{} changed since the state was saved (written while untracked)",
                    describe_region(r, device_size, partitions)
                )));
            }
        }
        Ok(None)
    }

    /// Checks the saved binding against block device `dev`; the difference, if any.
    pub fn mismatch_on_device(&self, dev: DevNum) -> Result<Option<String>> {
        let sysfs = dev.sysfs();
        let size = dev.sectors()? * 512;
        let identity = identity_of(&sysfs, Some(&udev_data(dev)));
        let (path, mut file) = open_device(dev)?;
        self.mismatch(&identity, &mut file, size, &partitions_of(&sysfs))
            .map_err(|e| KmodError::io(format!("cannot fingerprint {}", path.display()), e))
    }
}

/// "the first MiB of partition 2 (at byte 1048576)", "the first MiB of the device", ...
pub fn describe_region(r: &Region, device_size: u64, partitions: &[(u64, u64)]) -> String {
    let len = if r.len == SPAN {
        "MiB".to_string()
    } else {
        format!("{} bytes", r.len)
    };
    if r.offset == 0 {
        return format!("its first {len} (partition table, boot code, superblock)");
    }
    if r.offset + r.len == device_size {
        return format!("its last {len} (backup partition table, metadata at the end)");
    }
    match partitions.iter().position(|&(s, _)| s == r.offset) {
        Some(i) => format!(
            "the first {len} of its partition starting at byte {} (number {} by start; a \
             filesystem's superblock)",
            r.offset,
            i + 1
        ),
        None => format!("its {len} at byte {}", r.offset),
    }
}

fn udev_data(dev: DevNum) -> PathBuf {
    PathBuf::from(format!("/run/udev/data/b{}:{}", dev.major, dev.minor))
}

fn open_device(dev: DevNum) -> Result<(PathBuf, File)> {
    let path = dev.path().ok_or_else(|| {
        KmodError::Invalid(format!(
            "block device {dev} has no node under /dev: cannot fingerprint it"
        ))
    })?;
    // O_DIRECT: the disk's bytes, not a page cache that may be older than what a
    // filesystem with its own buffer cache (XFS) wrote last; buffered if refused.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(&path)
        .or_else(|_| File::open(&path))
        .map_err(|e| {
            KmodError::io(
                format!("cannot open {} to fingerprint it", path.display()),
                e,
            )
        })?;
    // The node must still be this device (a stale /dev could name another).
    if DevNum::of_block_device(&path)? != dev {
        return Err(KmodError::Invalid(format!(
            "{} is not block device {dev}: cannot fingerprint it",
            path.display()
        )));
    }
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn identity_text_round_trips_and_is_checked() {
        let id = vec![
            ("serial".to_string(), "QM 00005".to_string()),
            ("wwid".to_string(), "naa.5000c500a1b2c3d4".to_string()),
        ];
        let text = identity_text(&id);
        assert_eq!(text, "serial=QM 00005\nwwid=naa.5000c500a1b2c3d4\n");
        assert_eq!(parse_identity(text.as_bytes()).unwrap(), id);
        assert_eq!(parse_identity(b"").unwrap(), vec![]);
        for bad in [
            &b"serial=x"[..],
            b"Serial=x\n",
            b"serial=\n",
            b"serial\n",
            b"wwid=a\nserial=b\n",
            b"serial=a\nserial=b\n",
            b"serial=a\tb\n",
            b"serial=\xff\n",
        ] {
            assert!(
                parse_identity(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn identity_from_a_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let disk = root.path().join("vdb");
        let part = disk.join("vdb1");
        std::fs::create_dir_all(part.join("")).unwrap();
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("serial"), "vm-disk-b\n").unwrap();
        std::fs::write(disk.join("device/wwid"), "  t10.QEMU\n").unwrap();
        std::fs::write(part.join("partition"), "1\n").unwrap();
        std::fs::write(part.join("start"), "2048\n").unwrap();
        std::fs::write(part.join("size"), "4096\n").unwrap();
        let udev = root.path().join("b253:17");
        std::fs::write(
            &udev,
            "S:disk/by-id/x\nE:ID_PART_ENTRY_UUID=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        )
        .unwrap();
        let kv = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            identity_of(&disk, None),
            kv(&[("serial", "vm-disk-b"), ("wwid", "t10.QEMU")])
        );
        assert_eq!(
            identity_of(&part, Some(&udev)),
            kv(&[
                ("disk_serial", "vm-disk-b"),
                ("disk_wwid", "t10.QEMU"),
                ("partition", "1"),
                ("partuuid", "0fc63daf-8483-4772-8e79-3d69d8477de4"),
                ("start", "2048"),
            ])
        );
        assert_eq!(partitions_of(&disk), vec![(2048 * 512, 4096 * 512)]);
        // An empty serial (virtio without one) is no identity.
        std::fs::write(disk.join("serial"), "\n").unwrap();
        assert_eq!(identity_of(&disk, None), kv(&[("wwid", "t10.QEMU")]));
    }

    #[test]
    fn regions_cover_both_ends_and_every_partition_start() {
        let mib = SPAN;
        assert_eq!(plan_regions(512, &[]), vec![(0, 512)]);
        assert_eq!(plan_regions(mib, &[]), vec![(0, mib)]);
        assert_eq!(plan_regions(mib + 4096, &[]), vec![(0, mib), (mib, 4096)]);
        assert_eq!(
            plan_regions(
                100 * mib,
                &[(mib, 10 * mib), (11 * mib, 4096), (99 * mib, mib)]
            ),
            vec![(0, mib), (mib, mib), (11 * mib, 4096), (99 * mib, mib)]
        );
    }

    #[test]
    fn a_changed_byte_or_identity_is_named() {
        let size = 4 * SPAN;
        let mut disk = vec![7u8; size as usize];
        let parts = [(SPAN, 2 * SPAN)];
        let id = vec![("serial".to_string(), "A".to_string())];
        let regions = plan_regions(size, &parts);
        let b = Binding::compute(id.clone(), &mut Cursor::new(&disk), &regions).unwrap();
        assert_eq!(b.regions.len(), 3);
        let check = |disk: &[u8], id: &[(String, String)]| {
            b.mismatch(id, &mut Cursor::new(disk), size, &parts)
                .unwrap()
        };
        assert_eq!(check(&disk, &id), None);
        // Another key is ignored; another value or a missing key is not.
        let mut more = id.clone();
        more.push(("wwid".into(), "x".into()));
        assert_eq!(check(&disk, &more), None);
        let other = vec![("serial".to_string(), "B".to_string())];
        let m = check(&disk, &other).unwrap();
        assert!(m.contains("serial is \"B\", not \"A\""), "{m}");
        let m = check(&disk, &[]).unwrap();
        assert!(m.contains("cannot be read now"), "{m}");
        // A byte of the partition's first MiB (an ext4 superblock's mount count).
        disk[(SPAN + 1024 + 0x34) as usize] ^= 1;
        let m = check(&disk, &id).unwrap();
        assert!(m.contains("partition starting at byte 1048576"), "{m}");
        disk[(SPAN + 1024 + 0x34) as usize] ^= 1;
        disk[size as usize - 1] ^= 1;
        let m = check(&disk, &id).unwrap();
        assert!(m.contains("its last MiB"), "{m}");
        disk[size as usize - 1] ^= 1;
        disk[440] ^= 1;
        let m = check(&disk, &id).unwrap();
        assert!(m.contains("its first MiB"), "{m}");
        // A byte outside every region is not seen (the fingerprint is a sample).
        disk[440] ^= 1;
        disk[(2 * SPAN + 5) as usize] ^= 1;
        assert_eq!(check(&disk, &id), None);
        // A device now shorter than a region: an error, not a match.
        assert!(b
            .mismatch(&id, &mut Cursor::new(&disk[..100]), size, &parts)
            .is_err());
    }
}
