//! Superblock signature probes, reporting type, UUID and label the way blkid does.

use super::{be16, be32, format_uuid, label_text, le16, le32, FsInfo, FsKind};
use crate::region::Region;
use std::io;

type Probe = fn(&Region) -> io::Result<Option<FsInfo>>;

/// Runs every probe; a volume carrying signatures of two kinds is reported as unknown
/// (`None`), as blkid does, since trusting either one could be wrong.
pub fn detect(vol: &Region) -> io::Result<Option<FsInfo>> {
    let probes: [Probe; 7] = [
        probe_luks,
        probe_lvm,
        probe_xfs,
        probe_ext,
        probe_btrfs,
        probe_swap,
        probe_vfat,
    ];
    let mut found = None;
    for probe in probes {
        if let Some(info) = probe(vol)? {
            if found.is_some() {
                return Ok(None);
            }
            found = Some(info);
        }
    }
    Ok(found)
}

/// `len` bytes at `pos`, or `None` when the volume is too small to hold them.
fn read_at(vol: &Region, pos: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
    match pos.checked_add(len as u64) {
        Some(end) if end <= vol.len() => vol.read_vec(pos, len).map(Some),
        _ => Ok(None),
    }
}

/// blkid leaves out all-zero UUIDs.
fn uuid_field(raw: &[u8]) -> Option<String> {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&raw[..16]);
    (bytes != [0; 16]).then(|| format_uuid(&bytes))
}

const EXT_COMPAT_HAS_JOURNAL: u32 = 0x4;
const EXT_INCOMPAT_JOURNAL_DEV: u32 = 0x8;
// What blkid's ext2/ext3 probes accept; anything more makes it ext4.
const EXT2_INCOMPAT_SUPP: u32 = 0x2 | 0x10;
const EXT3_INCOMPAT_SUPP: u32 = 0x2 | 0x4 | 0x10;
const EXT23_RO_COMPAT_SUPP: u32 = 0x1 | 0x2 | 0x4;

fn probe_ext(vol: &Region) -> io::Result<Option<FsInfo>> {
    let Some(sb) = read_at(vol, 1024, 1024)? else {
        return Ok(None);
    };
    let log_block = le32(&sb, 0x18);
    if le16(&sb, 0x38) != 0xEF53 || log_block > 6 {
        return Ok(None);
    }
    let compat = le32(&sb, 0x5C);
    let incompat = le32(&sb, 0x60);
    let ro_compat = le32(&sb, 0x64);
    if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
        // An external journal ("jbd"), not a filesystem.
        return Ok(None);
    }
    let journal = compat & EXT_COMPAT_HAS_JOURNAL != 0;
    let ro_plain = ro_compat & !EXT23_RO_COMPAT_SUPP == 0;
    let kind = if !journal && ro_plain && incompat & !EXT2_INCOMPAT_SUPP == 0 {
        FsKind::Ext2
    } else if journal && ro_plain && incompat & !EXT3_INCOMPAT_SUPP == 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext4
    };
    Ok(Some(FsInfo {
        kind,
        uuid: uuid_field(&sb[0x68..0x78]),
        label: label_text(&sb[0x78..0x88]),
        block_size: Some(1024 << log_block),
    }))
}

fn probe_xfs(vol: &Region) -> io::Result<Option<FsInfo>> {
    let Some(sb) = read_at(vol, 0, 512)? else {
        return Ok(None);
    };
    let block_size = be32(&sb, 4);
    let sect_size = be16(&sb, 102);
    let sane = (512..=65536).contains(&block_size)
        && block_size.is_power_of_two()
        && sect_size.is_power_of_two()
        && sect_size >= 512
        && be32(&sb, 88) > 0;
    if &sb[0..4] != b"XFSB" || !sane {
        return Ok(None);
    }
    Ok(Some(FsInfo {
        kind: FsKind::Xfs,
        uuid: uuid_field(&sb[32..48]),
        label: label_text(&sb[108..120]),
        block_size: Some(block_size),
    }))
}

const BTRFS_SB: u64 = 65536;

fn probe_btrfs(vol: &Region) -> io::Result<Option<FsInfo>> {
    let Some(sb) = read_at(vol, BTRFS_SB, 4096)? else {
        return Ok(None);
    };
    if &sb[64..72] != b"_BHRfS_M" {
        return Ok(None);
    }
    // Like blkid, insist on a matching checksum when it is the crc32c kind.
    if le16(&sb, 196) == 0 && !super::crc32c_update(!0, &sb[32..]) != le32(&sb, 0) {
        return Ok(None);
    }
    Ok(Some(FsInfo {
        kind: FsKind::Btrfs,
        uuid: uuid_field(&sb[32..48]),
        label: label_text(&sb[299..299 + 256]),
        block_size: Some(le32(&sb, 144)),
    }))
}

const SWAP_PAGE_SIZES: [u64; 5] = [4096, 8192, 16384, 32768, 65536];

fn probe_swap(vol: &Region) -> io::Result<Option<FsInfo>> {
    for page in SWAP_PAGE_SIZES {
        let Some(magic) = read_at(vol, page - 10, 10)? else {
            return Ok(None);
        };
        if magic == b"SWAP-SPACE" {
            return Ok(Some(swap_info(None, None, page)));
        }
        if magic != b"SWAPSPACE2" {
            continue;
        }
        // swap_header v1: version, last_page, nr_badpages, uuid, volume name.
        let Some(hdr) = read_at(vol, 1024, 44)? else {
            return Ok(None);
        };
        let version = le32(&hdr, 0);
        if version != 1 && version.swap_bytes() != 1 {
            return Ok(None);
        }
        let uuid = uuid_field(&hdr[12..28]);
        return Ok(Some(swap_info(uuid, label_text(&hdr[28..44]), page)));
    }
    Ok(None)
}

fn swap_info(uuid: Option<String>, label: Option<String>, page: u64) -> FsInfo {
    FsInfo {
        kind: FsKind::Swap,
        uuid,
        label,
        block_size: Some(page as u32),
    }
}

fn probe_luks(vol: &Region) -> io::Result<Option<FsInfo>> {
    let Some(hdr) = read_at(vol, 0, 512)? else {
        return Ok(None);
    };
    let version = be16(&hdr, 6);
    if &hdr[0..6] != b"LUKS\xba\xbe" || !(version == 1 || version == 2) {
        return Ok(None);
    }
    Ok(Some(FsInfo {
        kind: FsKind::Luks,
        uuid: label_text(&hdr[168..208]),
        label: if version == 2 {
            label_text(&hdr[24..72])
        } else {
            None
        },
        block_size: None,
    }))
}

const LVM_LABEL_CRC_SEED: u32 = 0xF597_A6CF;

fn probe_lvm(vol: &Region) -> io::Result<Option<FsInfo>> {
    for sector in 0..4u64 {
        let Some(label) = read_at(vol, sector * 512, 512)? else {
            return Ok(None);
        };
        if &label[0..8] != b"LABELONE" || &label[24..32] != b"LVM2 001" {
            continue;
        }
        let sector_ok = u64::from(le32(&label, 8)) == sector && le32(&label, 12) == 0;
        let crc_ok = crc32_update(LVM_LABEL_CRC_SEED, &label[20..]) == le32(&label, 16);
        let pv_header = le32(&label, 20) as usize;
        if !sector_ok || !crc_ok || pv_header < 32 || pv_header + 32 > label.len() {
            continue;
        }
        return Ok(Some(FsInfo {
            kind: FsKind::LvmPv,
            uuid: Some(lvm_uuid(&label[pv_header..pv_header + 32])),
            label: None,
            block_size: None,
        }));
    }
    Ok(None)
}

/// LVM's 32-character id as blkid shows it: 6-4-4-4-4-4-6.
fn lvm_uuid(raw: &[u8]) -> String {
    let mut out = String::with_capacity(38);
    for (i, &c) in raw.iter().enumerate() {
        if matches!(i, 6 | 10 | 14 | 18 | 22 | 26) {
            out.push('-');
        }
        out.push(char::from(c));
    }
    out
}

/// The reflected CRC-32 (IEEE) register update without inversion, as LVM uses it.
fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

const FAT_NO_NAME: &[u8; 11] = b"NO NAME    ";
const FAT_ATTR_VOLUME_ID: u8 = 0x08;
const FAT_ATTR_DIR: u8 = 0x10;
const FAT_ATTR_LONG_NAME: u8 = 0x0F;
/// Bound on how much of the root directory is searched for a label entry.
const FAT_ROOT_SCAN_MAX: u64 = 256 * 1024;

/// The parts of a FAT boot sector the probe needs.
struct FatBoot {
    bytes_per_sector: u64,
    sectors_per_cluster: u64,
    reserved: u64,
    fats: u64,
    root_entries: u64,
    fat_size: u64,
    fat32: bool,
}

fn probe_vfat(vol: &Region) -> io::Result<Option<FsInfo>> {
    let Some(bs) = read_at(vol, 0, 512)? else {
        return Ok(None);
    };
    let Some(boot) = parse_fat_boot(&bs) else {
        return Ok(None);
    };
    // The extended BPB sits after the FAT32-only fields on FAT32.
    let ext = if boot.fat32 { 0x40 } else { 0x24 };
    let signature = bs[ext + 2];
    let serial = (signature == 0x29 || signature == 0x28).then(|| le32(&bs, ext + 3));
    let boot_label = (signature == 0x29).then(|| &bs[ext + 7..ext + 18]);
    let dir_label = fat_root_label(vol, &boot, &bs)?;
    let label = dir_label
        .as_deref()
        .or(boot_label)
        .filter(|l| l != FAT_NO_NAME)
        .and_then(label_text);
    Ok(Some(FsInfo {
        kind: FsKind::Vfat,
        uuid: serial.map(|s| format!("{:04X}-{:04X}", s >> 16, s & 0xFFFF)),
        label,
        block_size: Some(boot.bytes_per_sector as u32),
    }))
}

fn parse_fat_boot(bs: &[u8]) -> Option<FatBoot> {
    let bytes_per_sector = u64::from(le16(bs, 11));
    let sectors_per_cluster = u64::from(bs[13]);
    let media = bs[21];
    let total = match le16(bs, 19) {
        0 => le32(bs, 32),
        n => u32::from(n),
    };
    let fat16_size = u64::from(le16(bs, 22));
    let fat_size = if fat16_size == 0 {
        u64::from(le32(bs, 36))
    } else {
        fat16_size
    };
    let plausible = bs[510..512] == [0x55, 0xAA]
        && (bs[0] == 0xEB || bs[0] == 0xE9)
        && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && sectors_per_cluster.is_power_of_two()
        && le16(bs, 14) >= 1
        && (1..=4).contains(&bs[16])
        && (media == 0xF0 || media >= 0xF8)
        && total != 0
        && fat_size != 0;
    plausible.then(|| FatBoot {
        bytes_per_sector,
        sectors_per_cluster,
        reserved: u64::from(le16(bs, 14)),
        fats: u64::from(bs[16]),
        root_entries: u64::from(le16(bs, 17)),
        fat_size,
        fat32: fat16_size == 0,
    })
}

/// The volume-label entry of the root directory, which blkid prefers over the boot
/// sector's copy. FAT32 roots are searched in their first cluster only.
fn fat_root_label(vol: &Region, boot: &FatBoot, bs: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let fat_area_end = (boot.reserved + boot.fats * boot.fat_size) * boot.bytes_per_sector;
    let (start, len) = if boot.fat32 {
        let cluster = u64::from(le32(bs, 0x2C));
        if cluster < 2 {
            return Ok(None);
        }
        let cluster_bytes = boot.sectors_per_cluster * boot.bytes_per_sector;
        (fat_area_end + (cluster - 2) * cluster_bytes, cluster_bytes)
    } else {
        (fat_area_end, boot.root_entries * 32)
    };
    let len = len.min(FAT_ROOT_SCAN_MAX) as usize;
    let Some(dir) = read_at(vol, start, len)? else {
        return Ok(None);
    };
    for entry in dir.chunks_exact(32) {
        let attr = entry[11];
        match entry[0] {
            0x00 => break,
            0xE5 => continue,
            _ if attr & 0x3F == FAT_ATTR_LONG_NAME => continue,
            _ if attr & (FAT_ATTR_VOLUME_ID | FAT_ATTR_DIR) == FAT_ATTR_VOLUME_ID => {
                return Ok(Some(entry[..11].to_vec()));
            }
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::testutil::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn detect_file(image: &Path) -> Option<FsInfo> {
        detect(&region(image)).unwrap()
    }

    fn write_at(image: &Path, pos: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
        f.write_all_at(bytes, pos).unwrap();
    }

    #[test]
    fn vfat_16_and_32_match_blkid() {
        if !tools_available(&["mkfs.vfat", "blkid"]) {
            return;
        }
        let cases: [(&str, u64, &[&str], Option<&str>); 4] = [
            (
                "fat16",
                64,
                &["-F", "16", "-n", "MY LABEL", "-i", "1234ABCD"],
                Some("MY LABEL"),
            ),
            (
                "fat32",
                300,
                &["-F", "32", "-n", "BIGDISK", "-i", "DEADBEEF"],
                Some("BIGDISK"),
            ),
            ("fat32-nolabel", 300, &["-F", "32", "-i", "0BADF00D"], None),
            ("fat12", 4, &["-F", "12", "-n", "TINY"], Some("TINY")),
        ];
        for (tag, mib, args, label) in cases {
            let img = image(tag, mib);
            let mut full = args.to_vec();
            full.push(img.as_str());
            run("mkfs.vfat", &full);
            let info = detect_file(img.path()).unwrap_or_else(|| panic!("{tag} not detected"));
            assert_eq!(info.kind, FsKind::Vfat, "{tag}");
            assert_eq!(info.label.as_deref(), label, "{tag}");
            assert_eq!(info.block_size, Some(512), "{tag}");
            assert_matches_blkid(img.path(), &info);
            let vol = region(img.path());
            assert!(crate::fs::used_ranges(&vol, &info).unwrap().is_none());
        }
    }

    #[test]
    fn vfat_serial_format() {
        if !tools_available(&["mkfs.vfat"]) {
            return;
        }
        let img = image("fat-serial", 64);
        run("mkfs.vfat", &["-F", "16", "-i", "0000ABCD", img.as_str()]);
        assert_eq!(
            detect_file(img.path()).unwrap().uuid.as_deref(),
            Some("0000-ABCD")
        );
    }

    #[test]
    fn swap_matches_blkid() {
        if !tools_available(&["mkswap", "blkid"]) {
            return;
        }
        let img = image("swap", 64);
        let uuid = "0a1b2c3d-4e5f-4061-8728-394a5b6c7d8e";
        run("mkswap", &["-U", uuid, "-L", "swaplbl", img.as_str()]);
        let info = detect_file(img.path()).expect("swap detected");
        assert_eq!(info.kind, FsKind::Swap);
        assert_eq!(info.uuid.as_deref(), Some(uuid));
        assert_eq!(info.label.as_deref(), Some("swaplbl"));
        assert_matches_blkid(img.path(), &info);

        let plain = image("swap-plain", 16);
        run("mkswap", &[plain.as_str()]);
        let info = detect_file(plain.path()).expect("swap detected");
        assert_eq!(info.label, None);
        assert_matches_blkid(plain.path(), &info);
    }

    #[test]
    fn luks_matches_blkid() {
        if !tools_available(&["cryptsetup", "blkid"]) {
            return;
        }
        let key = TempPath(temp_name("key"));
        std::fs::write(key.path(), b"not a secret").unwrap();
        for (tag, extra) in [
            ("luks1", &["--type", "luks1"][..]),
            (
                "luks2",
                &["--type", "luks2", "--label", "vault", "--pbkdf", "pbkdf2"][..],
            ),
        ] {
            let img = image(tag, 32);
            let mut args = vec!["luksFormat", "-q", "--pbkdf-force-iterations", "1000"];
            args.extend_from_slice(extra);
            args.extend(["--key-file", key.as_str(), img.as_str()]);
            run("cryptsetup", &args);
            let info = detect_file(img.path()).expect("LUKS detected");
            assert_eq!(info.kind, FsKind::Luks);
            assert!(info.uuid.is_some());
            assert_matches_blkid(img.path(), &info);
        }
    }

    #[test]
    fn lvm_pv_matches_blkid() {
        if !tools_available(&["pvcreate", "losetup", "blkid"]) {
            return;
        }
        let img = image("lvm", 32);
        let dev = run("losetup", &["-f", "--show", img.as_str()])
            .trim()
            .to_string();
        let created = run_unchecked("pvcreate", &["-q", &dev]).status.success();
        run("losetup", &["-d", &dev]);
        if !created {
            skip("pvcreate failed");
            return;
        }
        let info = detect_file(img.path()).expect("PV detected");
        assert_eq!(info.kind, FsKind::LvmPv);
        assert_eq!(info.uuid.as_ref().map(String::len), Some(38));
        assert_matches_blkid(img.path(), &info);
    }

    /// No mkfs.btrfs here: a hand-made superblock with a valid checksum.
    #[test]
    fn btrfs_superblock_matches_blkid() {
        if !tools_available(&["blkid"]) {
            return;
        }
        let img = image("btrfs", 1);
        let mut sb = vec![0u8; 4096];
        let fsid: [u8; 16] = core::array::from_fn(|i| 0x10 + i as u8);
        sb[32..48].copy_from_slice(&fsid);
        sb[48..56].copy_from_slice(&65536u64.to_le_bytes());
        sb[64..72].copy_from_slice(b"_BHRfS_M");
        sb[112..120].copy_from_slice(&(1u64 << 20).to_le_bytes());
        sb[136..144].copy_from_slice(&1u64.to_le_bytes());
        for off in [144, 148, 152] {
            sb[off..off + 4].copy_from_slice(&4096u32.to_le_bytes());
        }
        sb[299..308].copy_from_slice(b"fakebtrfs");
        let crc = !crate::fs::crc32c_update(!0, &sb[32..]);
        sb[0..4].copy_from_slice(&crc.to_le_bytes());
        write_at(img.path(), BTRFS_SB, &sb);

        let info = detect_file(img.path()).expect("btrfs detected");
        assert_eq!(info.kind, FsKind::Btrfs);
        assert_eq!(
            info.uuid.as_deref(),
            Some("10111213-1415-1617-1819-1a1b1c1d1e1f")
        );
        assert_eq!(info.label.as_deref(), Some("fakebtrfs"));
        assert_matches_blkid(img.path(), &info);

        write_at(img.path(), BTRFS_SB + 100, &[1]);
        assert_eq!(detect_file(img.path()), None, "bad checksum must not count");
    }

    #[test]
    fn tiny_and_empty_volumes_detect_nothing() {
        for len in [0u64, 100, 511, 512, 1500, 2047, 2048, 4095, 5000, 70000] {
            let img = TempPath(temp_name("tiny.img"));
            let f = std::fs::File::create(img.path()).unwrap();
            f.set_len(len).unwrap();
            assert_eq!(detect_file(img.path()), None, "{len} zero bytes");
            // Magic numbers alone, cut short, must not make a probe read past the end.
            if len >= 1024 + 58 {
                write_at(img.path(), 1024 + 0x38, &0xEF53u16.to_le_bytes());
            }
            if len >= 4 {
                write_at(img.path(), 0, b"XFSB");
            }
            let _ = detect_file(img.path());
        }
    }

    #[test]
    fn two_signatures_are_ambiguous() {
        if !tools_available(&["mkfs.xfs"]) {
            return;
        }
        let img = image("xfs-and-swap", 512);
        run("mkfs.xfs", &["-q", "-f", img.as_str()]);
        assert_eq!(detect_file(img.path()).map(|i| i.kind), Some(FsKind::Xfs));
        write_at(img.path(), 4096 - 10, b"SWAPSPACE2");
        write_at(img.path(), 1024, &1u32.to_le_bytes());
        assert_eq!(detect_file(img.path()), None);
    }

    #[test]
    fn lvm_uuid_dashes() {
        assert_eq!(
            lvm_uuid(b"gZH83FQBFdcscJqLSd9pbN6IUlT4J1G1"),
            "gZH83F-QBFd-cscJ-qLSd-9pbN-6IUl-T4J1G1"
        );
    }
}
