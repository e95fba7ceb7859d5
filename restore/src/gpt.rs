//! Encoding GPT partition tables from a manifest's description: protective MBR entry,
//! primary header and entries after LBA 0, backup entries and header at the disk's end.

use anyhow::{bail, Context, Result};
use bkimg_format::manifest::GptTable;
use uuid::Uuid;

/// The sectors to write, as (byte offset, bytes).
pub struct GptSectors {
    pub writes: Vec<(u64, Vec<u8>)>,
}

/// Encodes `table` for a disk of `disk_bytes` with `sector`-byte sectors. On a disk larger
/// than the original the backup moves to the new end and the last usable LBA follows it.
pub fn encode(
    table: &GptTable,
    disk_bytes: u64,
    sector: u32,
    source_bytes: u64,
) -> Result<GptSectors> {
    let ss = u64::from(sector);
    let last_lba = disk_bytes / ss - 1;
    let entries_len = u64::from(table.entry_count) * u64::from(table.entry_size);
    if table.entry_size != 128 || entries_len == 0 {
        bail!("GPT entry size {} is not supported", table.entry_size);
    }
    let entry_sectors = entries_len.div_ceil(ss);
    let backup_entries_lba = last_lba - entry_sectors;
    let last_usable = if disk_bytes == source_bytes {
        table.last_usable_lba
    } else {
        backup_entries_lba - 1
    };
    let highest = table
        .partitions
        .iter()
        .map(|p| p.last_lba)
        .max()
        .unwrap_or(0);
    if highest > last_usable || table.first_usable_lba <= table.entries_lba {
        bail!("the GPT layout does not fit a {disk_bytes}-byte disk");
    }

    let mut entries = vec![0u8; (entry_sectors * ss) as usize];
    for p in &table.partitions {
        let slot = p.number.checked_sub(1).filter(|&s| s < table.entry_count);
        let Some(slot) = slot else {
            bail!(
                "GPT partition number {} is outside the entry array",
                p.number
            );
        };
        let e = &mut entries[slot as usize * 128..(slot as usize + 1) * 128];
        e[0..16].copy_from_slice(&guid(&p.type_guid)?.to_bytes_le());
        e[16..32].copy_from_slice(&guid(&p.unique_guid)?.to_bytes_le());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (i, unit) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let entries_crc = crc32fast::hash(&entries[..entries_len as usize]);
    let disk_guid = guid(&table.disk_guid)?;
    let header = |current: u64, backup: u64, entries_at: u64| {
        let mut h = vec![0u8; ss as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&table.first_usable_lba.to_le_bytes());
        h[48..56].copy_from_slice(&last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid.to_bytes_le());
        h[72..80].copy_from_slice(&entries_at.to_le_bytes());
        h[80..84].copy_from_slice(&table.entry_count.to_le_bytes());
        h[84..88].copy_from_slice(&table.entry_size.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    Ok(GptSectors {
        writes: vec![
            (ss, header(1, last_lba, table.entries_lba)),
            (table.entries_lba * ss, entries.clone()),
            (backup_entries_lba * ss, entries),
            (last_lba * ss, header(last_lba, 1, backup_entries_lba)),
        ],
    })
}

/// The protective MBR's 0xEE entry for a disk of `disk_bytes`, patched into `lba0`.
pub fn patch_protective_mbr(lba0: &mut [u8], disk_bytes: u64, sector: u32) {
    let sectors = (disk_bytes / u64::from(sector) - 1).min(0xffff_ffff) as u32;
    for i in 0..4 {
        let e = &mut lba0[446 + 16 * i..446 + 16 * (i + 1)];
        if e[4] == 0xee {
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
            return;
        }
    }
    // No protective entry (damaged boot sector): write a standard one.
    let e = &mut lba0[446..462];
    e.copy_from_slice(&[0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 0, 0, 0]);
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    lba0[510] = 0x55;
    lba0[511] = 0xaa;
}

fn guid(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text).with_context(|| format!("bad GUID {text:?} in the manifest"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::process::Command;
    use std::sync::Arc;

    use bkimg_capture::region::Region;
    use bkimg_format::manifest::PartitionTable;

    use super::*;

    fn sgdisk(args: &[&str]) -> Option<String> {
        let out = Command::new("sgdisk").args(args).output().ok()?;
        assert!(out.status.success(), "sgdisk {args:?}: {out:?}");
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn table_of(path: &std::path::Path, size: u64) -> GptTable {
        let file = Arc::new(std::fs::File::open(path).unwrap());
        match bkimg_capture::table::read(&Region::new(file, 0, size), 512)
            .unwrap()
            .table
        {
            PartitionTable::Gpt(t) => t,
            other => panic!("expected GPT, got {other:?}"),
        }
    }

    /// Re-encoding a table sgdisk wrote gives sgdisk's bytes; on a larger disk the backup
    /// moves to the end and sgdisk and the gpt crate both accept the result.
    #[test]
    fn encoding_matches_sgdisk_and_grows() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let size = 64u64 << 20;
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let p = img.to_str().unwrap();
        if sgdisk(&[
            "-n1:2048:+8M",
            "-t1:ef00",
            "-c1:EFI system",
            "-n3:0:+16M",
            "-A3:set:2",
            "-A3:set:60",
            "-c3:data \u{e9}t\u{e9}",
            "-n2:0:0",
            p,
        ])
        .is_none()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "sgdisk is not installed: CI must run this test (.ci/test installs gdisk)"
            );
            eprintln!("skipping: sgdisk not installed");
            return;
        }
        let original = std::fs::read(&img).unwrap();
        let table = table_of(&img, size);
        assert_eq!(table.partitions.len(), 3);

        let same = encode(&table, size, 512, size).unwrap();
        for (offset, bytes) in &same.writes {
            let o = *offset as usize;
            assert_eq!(
                &original[o..o + bytes.len()],
                &bytes[..],
                "bytes at {offset}"
            );
        }

        let bigger = dir.path().join("big.img");
        let big = size + (16 << 20);
        let f = std::fs::File::create(&bigger).unwrap();
        f.set_len(big).unwrap();
        let mut lba0 = original[..512].to_vec();
        patch_protective_mbr(&mut lba0, big, 512);
        f.write_all_at(&lba0, 0).unwrap();
        for (offset, bytes) in encode(&table, big, 512, size).unwrap().writes {
            f.write_all_at(&bytes, offset).unwrap();
        }
        let verify = sgdisk(&["-v", bigger.to_str().unwrap()]).unwrap();
        assert!(verify.contains("No problems found"), "{verify}");
        let regrown = table_of(&bigger, big);
        assert_eq!(regrown.partitions, table.partitions);
        assert_eq!(regrown.disk_guid, table.disk_guid);
        assert_eq!(regrown.last_usable_lba, big / 512 - 34);
    }
}
