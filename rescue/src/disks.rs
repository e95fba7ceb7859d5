//! The machine's disks as the rescue system sees them, and which one each source disk of
//! a restore point is written to.
//!
//! The default rule is built to never destroy the wrong disk: a target must be at least as
//! large as the source disk, have its sector size, not be the boot media, and be blank
//! (its first and last MiB all zeros) unless overwriting was allowed; when more than one
//! disk qualifies the mapping is refused until a rule names the disk.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A disk of the restore point.
#[derive(Clone, Debug)]
pub struct SourceDisk {
    pub name: String,
    pub size: u64,
    pub sector: u32,
}

/// A whole disk of this machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Kernel name ("nvme0n1").
    pub name: String,
    pub dev: PathBuf,
    pub size: u64,
    pub sector: u32,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
    /// The media this rescue system booted from is on this disk.
    pub is_media: bool,
    /// The repository being restored from is on this disk.
    pub holds_repository: bool,
    /// What the disk holds, when not blank ("a GPT partition table", "data").
    pub holds: Option<String>,
}

/// How a `[[disk]]` entry of the config picks the target of one source disk.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskRule {
    /// Source disk of the restore point ("disk0").
    pub source: String,
    /// Device path ("/dev/nvme0n1", "/dev/disk/by-path/...").
    pub target: Option<PathBuf>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct MapError(pub String);

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MapError {}

/// Chooses a target disk for every source disk. `resolve` turns a rule's device path into
/// the kernel name it points at (symlinks under /dev/disk).
pub fn map_disks(
    sources: &[SourceDisk],
    candidates: &[Candidate],
    rules: &[DiskRule],
    overwrite: bool,
    resolve: &dyn Fn(&Path) -> Option<String>,
) -> Result<Vec<(String, PathBuf)>, MapError> {
    for rule in rules {
        if !sources.iter().any(|s| s.name == rule.source) {
            return Err(MapError(format!(
                "a [[disk]] rule names source {:?}, which the restore point does not have (it has {})",
                rule.source,
                names(sources.iter().map(|s| s.name.as_str()))
            )));
        }
    }
    let mut taken: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    // Ruled disks first, so that the default rule never takes a disk a rule names.
    let mut order: Vec<&SourceDisk> = sources.iter().collect();
    order.sort_by_key(|s| !rules.iter().any(|r| r.source == s.name));
    for source in order {
        let chosen = match rules.iter().find(|r| r.source == source.name) {
            Some(rule) => by_rule(source, rule, candidates, resolve)?,
            None => by_default(source, candidates, &taken, overwrite)?,
        };
        if taken.contains(&chosen.name.as_str()) {
            return Err(MapError(format!(
                "{} would receive two source disks: make the [[disk]] rules name different disks",
                chosen.dev.display()
            )));
        }
        if chosen.is_media {
            return Err(MapError(format!(
                "{} holds the rescue media itself: it is never a restore target",
                chosen.dev.display()
            )));
        }
        if chosen.holds_repository {
            return Err(MapError(format!(
                "{} holds the repository being restored from: it is never a restore target",
                chosen.dev.display()
            )));
        }
        check_fits(source, chosen)?;
        if let (Some(holds), false) = (&chosen.holds, overwrite) {
            return Err(MapError(format!(
                "{} ({}) holds {holds}: set overwrite = true in the rescue config (or bkimg.overwrite=1) to replace it",
                chosen.dev.display(),
                describe(chosen)
            )));
        }
        taken.push(&chosen.name);
        out.push((source.name.clone(), chosen.dev.clone()));
    }
    out.sort();
    Ok(out)
}

fn by_rule<'a>(
    source: &SourceDisk,
    rule: &DiskRule,
    candidates: &'a [Candidate],
    resolve: &dyn Fn(&Path) -> Option<String>,
) -> Result<&'a Candidate, MapError> {
    let wanted_name = rule.target.as_deref().map(resolve);
    let matches: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            wanted_name
                .as_ref()
                .is_none_or(|n| n.as_deref() == Some(&c.name))
                && eq(&rule.serial, &c.serial)
                && eq(&rule.wwn, &c.wwn)
                && eq(&rule.model, &c.model)
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(MapError(format!(
            "no disk of this machine matches the [[disk]] rule for {} ({}); disks: {}",
            source.name,
            rule_text(rule),
            list(candidates)
        ))),
        many => Err(MapError(format!(
            "the [[disk]] rule for {} ({}) matches {} disks: {}; add serial or wwn to pick one",
            source.name,
            rule_text(rule),
            many.len(),
            list_refs(many)
        ))),
    }
}

fn eq(rule: &Option<String>, value: &Option<String>) -> bool {
    match rule {
        None => true,
        Some(r) => value.as_deref().map(str::trim) == Some(r.trim()),
    }
}

fn by_default<'a>(
    source: &SourceDisk,
    candidates: &'a [Candidate],
    taken: &[&str],
    overwrite: bool,
) -> Result<&'a Candidate, MapError> {
    let mut reasons = Vec::new();
    let mut fit = Vec::new();
    for c in candidates {
        let why = if taken.contains(&c.name.as_str()) {
            Some("taken by another source disk".to_string())
        } else if c.is_media {
            Some("the rescue media".to_string())
        } else if c.holds_repository {
            Some("holds the repository".to_string())
        } else if c.size < source.size {
            Some(format!(
                "too small ({} < {})",
                size(c.size),
                size(source.size)
            ))
        } else if c.sector != source.sector {
            Some(format!(
                "{}-byte sectors, the source has {}",
                c.sector, source.sector
            ))
        } else if let (Some(h), false) = (&c.holds, overwrite) {
            Some(format!("holds {h}"))
        } else {
            None
        };
        match why {
            Some(why) => reasons.push(format!("{} {why}", c.dev.display())),
            None => fit.push(c),
        }
    }
    match fit.as_slice() {
        [one] => Ok(one),
        [] => Err(MapError(format!(
            "no disk can receive {} ({}, {}-byte sectors): {}{}",
            source.name,
            size(source.size),
            source.sector,
            if reasons.is_empty() {
                "this machine has no disks".to_string()
            } else {
                reasons.join("; ")
            },
            if overwrite {
                ""
            } else {
                " (a disk that holds data is only chosen with overwrite = true)"
            }
        ))),
        many => Err(MapError(format!(
            "{} disks could receive {}: {}; nothing was written. Name one with a [[disk]] rule \
             (source = \"{}\", target, serial or wwn) or bkimg.target={}=/dev/NAME",
            many.len(),
            source.name,
            list_refs(many),
            source.name,
            source.name
        ))),
    }
}

/// The disks a person may pick for `source`: large enough, the same sector size, neither
/// the media nor the repository's disk, not `taken`. Disks that hold data are included
/// (the menu says what they hold and the person confirms).
pub fn eligible<'a>(
    source: &SourceDisk,
    candidates: &'a [Candidate],
    taken: &[&str],
) -> Vec<&'a Candidate> {
    candidates
        .iter()
        .filter(|c| {
            !taken.contains(&c.name.as_str())
                && !c.is_media
                && !c.holds_repository
                && check_fits(source, c).is_ok()
        })
        .collect()
}

fn check_fits(source: &SourceDisk, c: &Candidate) -> Result<(), MapError> {
    if c.size < source.size {
        return Err(MapError(format!(
            "{} is too small for {}: {} < {}",
            c.dev.display(),
            source.name,
            size(c.size),
            size(source.size)
        )));
    }
    if c.sector != source.sector {
        return Err(MapError(format!(
            "{} has {}-byte sectors and {} has {}: its partition table would not be found",
            c.dev.display(),
            c.sector,
            source.name,
            source.sector
        )));
    }
    Ok(())
}

fn rule_text(rule: &DiskRule) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &rule.target {
        parts.push(format!("target {}", t.display()));
    }
    for (k, v) in [
        ("serial", &rule.serial),
        ("wwn", &rule.wwn),
        ("model", &rule.model),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k} {v}"));
        }
    }
    if parts.is_empty() {
        "no condition".into()
    } else {
        parts.join(", ")
    }
}

pub fn describe(c: &Candidate) -> String {
    let mut s = size(c.size);
    if let Some(m) = &c.model {
        s.push_str(&format!(", {}", m.trim()));
    }
    if let Some(serial) = &c.serial {
        s.push_str(&format!(", serial {}", serial.trim()));
    }
    s
}

fn list(c: &[Candidate]) -> String {
    list_refs(&c.iter().collect::<Vec<_>>())
}

fn list_refs(c: &[&Candidate]) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|c| format!("{} ({})", c.dev.display(), describe(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

pub fn size(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The whole disks under `sys_block` (normally /sys/block): no partitions, loop, RAM, CD or
/// device-mapper devices. `media` is the kernel name of the disk the rescue booted from.
pub fn discover(sys_block: &Path, dev: &Path, media: Option<&str>) -> Vec<Candidate> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return out;
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        if ["loop", "ram", "zram", "sr", "dm-", "md", "fd", "nbd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let base = sys_block.join(&name);
        let read = |rel: &str| {
            std::fs::read_to_string(base.join(rel))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let sectors: u64 = read("size").and_then(|s| s.parse().ok()).unwrap_or(0);
        if sectors == 0 {
            continue; // an empty card reader or a drive without media
        }
        let path = dev.join(&name);
        let size = sectors * 512;
        out.push(Candidate {
            sector: read("queue/logical_block_size")
                .and_then(|s| s.parse().ok())
                .unwrap_or(512),
            serial: read("device/serial").or_else(|| read("serial")),
            wwn: read("device/wwid").or_else(|| read("wwid")),
            model: read("device/model"),
            is_media: media == Some(name.as_str()),
            holds_repository: false,
            holds: holds(&path, size),
            name,
            dev: path,
            size,
        });
    }
    out
}

/// What a disk holds, read from its first and last MiB: None when both are all zeros.
pub fn holds(dev: &Path, size: u64) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(dev) else {
        return Some("unreadable data".into());
    };
    let mib = 1u64 << 20;
    let mut head = vec![0u8; mib.min(size) as usize];
    if f.read_exact_at(&mut head, 0).is_err() {
        return Some("unreadable data".into());
    }
    let mut tail = vec![0u8; mib.min(size) as usize];
    let tail_at = size - tail.len() as u64;
    if f.read_exact_at(&mut tail, tail_at).is_err() {
        return Some("unreadable data".into());
    }
    if head.iter().chain(&tail).all(|&b| b == 0) {
        return None;
    }
    Some(signature(&head).to_string())
}

/// A name for what the first MiB of a disk starts with.
pub fn signature(head: &[u8]) -> &'static str {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        "a GPT partition table"
    } else if at(1080, &[0x53, 0xef]) {
        "an ext2/3/4 filesystem"
    } else if at(0, b"XFSB") {
        "an XFS filesystem"
    } else if at(0, b"LUKS\xba\xbe") {
        "a LUKS volume"
    } else if at(32769, b"CD001") {
        "an ISO 9660 filesystem"
    } else if at(510, &[0x55, 0xaa]) {
        "an MBR partition table or boot sector"
    } else {
        "data"
    }
}

/// The filesystem type (for mount(2)) whose superblock starts `head` (64 KiB): ISO 9660
/// first, as a hybrid image also carries a partition table.
pub fn filesystem(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(32769, b"CD001") {
        Some("iso9660")
    } else if at(1080, &[0x53, 0xef]) {
        Some("ext4")
    } else if at(0, b"XFSB") {
        Some("xfs")
    } else if at(510, &[0x55, 0xaa]) && (at(54, b"FAT") || at(82, b"FAT32")) {
        Some("vfat")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn disk(name: &str, size: u64) -> Candidate {
        Candidate {
            name: name.into(),
            dev: PathBuf::from(format!("/dev/{name}")),
            size,
            sector: 512,
            serial: Some(format!("SN-{name}")),
            ..Candidate::default()
        }
    }

    fn src(name: &str, size: u64) -> SourceDisk {
        SourceDisk {
            name: name.into(),
            size,
            sector: 512,
        }
    }

    fn no_links(_: &Path) -> Option<String> {
        None
    }

    #[test]
    fn the_one_blank_disk_large_enough_is_chosen() {
        let disks = [disk("vda", GIB), disk("nvme0n1", 8 * GIB)];
        let m = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], false, &no_links).unwrap();
        assert_eq!(m, [("disk0".into(), PathBuf::from("/dev/nvme0n1"))]);
    }

    #[test]
    fn two_candidates_are_refused_with_both_named() {
        let disks = [disk("sda", 8 * GIB), disk("sdb", 8 * GIB)];
        let e = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], false, &no_links).unwrap_err();
        assert!(e.0.contains("2 disks could receive disk0"), "{e}");
        assert!(e.0.contains("/dev/sda") && e.0.contains("/dev/sdb"), "{e}");
        assert!(e.0.contains("nothing was written"), "{e}");
    }

    #[test]
    fn the_boot_media_is_never_chosen_even_by_rule() {
        let mut stick = disk("sda", 16 * GIB);
        stick.is_media = true;
        let disks = [stick, disk("vda", GIB)];
        let e = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], false, &no_links).unwrap_err();
        assert!(e.0.contains("/dev/sda the rescue media"), "{e}");
        assert!(e.0.contains("/dev/vda too small"), "{e}");
        let rule = DiskRule {
            source: "disk0".into(),
            serial: Some("SN-sda".into()),
            ..DiskRule::default()
        };
        let e = map_disks(&[src("disk0", 4 * GIB)], &disks, &[rule], true, &no_links).unwrap_err();
        assert!(e.0.contains("holds the rescue media itself"), "{e}");
    }

    #[test]
    fn the_repository_disk_is_never_chosen_even_with_overwrite() {
        let mut repo = disk("sdb", 16 * GIB);
        repo.holds_repository = true;
        repo.holds = Some("an ext2/3/4 filesystem".into());
        let disks = [repo, disk("sda", 8 * GIB)];
        let m = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], true, &no_links).unwrap();
        assert_eq!(m[0].1, PathBuf::from("/dev/sda"));
        let rule = DiskRule {
            source: "disk0".into(),
            serial: Some("SN-sdb".into()),
            ..DiskRule::default()
        };
        let e = map_disks(&[src("disk0", 4 * GIB)], &disks, &[rule], true, &no_links).unwrap_err();
        assert!(
            e.0.contains("holds the repository being restored from"),
            "{e}"
        );
    }

    #[test]
    fn a_disk_holding_data_needs_overwrite() {
        let mut used = disk("sda", 8 * GIB);
        used.holds = Some("a GPT partition table".into());
        let disks = [used];
        let e = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], false, &no_links).unwrap_err();
        assert!(e.0.contains("holds a GPT partition table"), "{e}");
        assert!(e.0.contains("overwrite = true"), "{e}");
        let m = map_disks(&[src("disk0", 4 * GIB)], &disks, &[], true, &no_links).unwrap();
        assert_eq!(m[0].1, PathBuf::from("/dev/sda"));
    }

    #[test]
    fn rules_pick_by_serial_or_path_and_the_rest_by_default() {
        let disks = [disk("sda", 8 * GIB), disk("sdb", 8 * GIB), disk("sdc", GIB)];
        let rules = [DiskRule {
            source: "disk1".into(),
            target: Some("/dev/disk/by-path/pci-0000:00:1f.2-ata-2".into()),
            ..DiskRule::default()
        }];
        let resolve = |p: &Path| {
            (p == Path::new("/dev/disk/by-path/pci-0000:00:1f.2-ata-2")).then(|| "sdb".to_string())
        };
        let m = map_disks(
            &[src("disk0", 4 * GIB), src("disk1", 2 * GIB)],
            &disks,
            &rules,
            false,
            &resolve,
        )
        .unwrap();
        assert_eq!(
            m,
            [
                ("disk0".into(), PathBuf::from("/dev/sda")),
                ("disk1".into(), PathBuf::from("/dev/sdb"))
            ]
        );
        let by_serial = [DiskRule {
            source: "disk0".into(),
            serial: Some("SN-sdb".into()),
            ..DiskRule::default()
        }];
        let m = map_disks(
            &[src("disk0", 4 * GIB)],
            &disks,
            &by_serial,
            false,
            &no_links,
        )
        .unwrap();
        assert_eq!(m[0].1, PathBuf::from("/dev/sdb"));
    }

    #[test]
    fn a_rule_for_a_small_disk_or_an_unknown_source_is_refused() {
        let disks = [disk("sda", GIB)];
        let rule = DiskRule {
            source: "disk0".into(),
            target: Some("/dev/sda".into()),
            ..DiskRule::default()
        };
        let resolve = |_: &Path| Some("sda".to_string());
        let e = map_disks(
            &[src("disk0", 4 * GIB)],
            &disks,
            std::slice::from_ref(&rule),
            false,
            &resolve,
        )
        .unwrap_err();
        assert!(e.0.contains("/dev/sda is too small for disk0"), "{e}");
        let stray = DiskRule {
            source: "disk7".into(),
            ..rule
        };
        let e = map_disks(&[src("disk0", GIB)], &disks, &[stray], false, &resolve).unwrap_err();
        assert!(e.0.contains("\"disk7\""), "{e}");
    }

    #[test]
    fn sector_size_must_match() {
        let mut d = disk("nvme0n1", 8 * GIB);
        d.sector = 4096;
        let e = map_disks(&[src("disk0", GIB)], &[d], &[], false, &no_links).unwrap_err();
        assert!(e.0.contains("4096-byte sectors"), "{e}");
    }

    #[test]
    fn signatures_are_named() {
        let mut head = vec![0u8; 1 << 20];
        assert_eq!(signature(&head), "data");
        head[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(signature(&head), "a GPT partition table");
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        assert_eq!(signature(&ext), "an ext2/3/4 filesystem");
        assert_eq!(filesystem(&ext), Some("ext4"));
        let mut fat = vec![0u8; 4096];
        fat[510] = 0x55;
        fat[511] = 0xaa;
        assert_eq!(filesystem(&fat), None, "an MBR alone is no filesystem");
        fat[82..87].copy_from_slice(b"FAT32");
        assert_eq!(filesystem(&fat), Some("vfat"));
        let mut iso = vec![0u8; 64 << 10];
        iso[512..520].copy_from_slice(b"EFI PART");
        iso[32769..32774].copy_from_slice(b"CD001");
        assert_eq!(filesystem(&iso), Some("iso9660"));
    }

    #[test]
    fn blank_and_used_image_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blank.img");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(8 << 20).unwrap();
        assert_eq!(holds(&f, 8 << 20), None);
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"x", (8 << 20) - 10).unwrap();
        assert_eq!(holds(&f, 8 << 20).as_deref(), Some("data"));
    }
}
