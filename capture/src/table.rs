//! Reading partition tables: GPT (through the `gpt` crate) and msdos (MBR with logical
//! partitions in an extended partition chain).

use anyhow::{bail, Context, Result};
use bkimg_format::manifest::{GptPartition, GptTable, MsdosPartition, MsdosTable, PartitionTable};

use crate::region::Region;

/// A partition as a byte range of its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
}

/// The table and the partitions to capture as volumes (extended containers excluded).
pub struct TableInfo {
    pub table: PartitionTable,
    pub partitions: Vec<Extent>,
}

/// Reads the table of `disk`; `PartitionTable::None` when there is none.
pub fn read(disk: &Region, sector: u32) -> Result<TableInfo> {
    if disk.len() < 2 * u64::from(sector) {
        return Ok(none());
    }
    let lba0 = disk.read_vec(0, 512)?;
    if lba0[510..512] != [0x55, 0xaa] {
        return Ok(none());
    }
    let has_protective = mbr_entries(&lba0).iter().any(|e| e.type_id == 0xee);
    let gpt_sig = disk.read_vec(u64::from(sector), 8)?;
    if has_protective && gpt_sig == b"EFI PART" {
        return read_gpt(disk, sector);
    }
    read_msdos(disk, &lba0, sector)
}

fn none() -> TableInfo {
    TableInfo {
        table: PartitionTable::None,
        partitions: Vec::new(),
    }
}

fn read_gpt(disk: &Region, sector: u32) -> Result<TableInfo> {
    let hdr = disk.read_vec(u64::from(sector), 92)?;
    let entry_size = u32::from_le_bytes(hdr[84..88].try_into().expect("4 bytes"));
    let entry_count = u32::from_le_bytes(hdr[80..84].try_into().expect("4 bytes"));
    // The gpt crate asserts 128-byte entries; refuse others with a message instead.
    if entry_size != 128 || entry_count == 0 || entry_count > 4096 {
        bail!(
            "GPT header declares {entry_count} entries of {entry_size} bytes; bkimg handles \
             1-4096 entries of 128 bytes: capture the partitions as separate sources"
        );
    }
    let lb = match sector {
        512 => gpt::disk::LogicalBlockSize::Lb512,
        4096 => gpt::disk::LogicalBlockSize::Lb4096,
        other => bail!("logical sector size {other} is not supported for GPT disks"),
    };
    let file = disk.file().try_clone().context("reopening the source")?;
    let gdisk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open_from_device(file)
        .context("reading the GPT partition table (both headers damaged?)")?;
    let h = gdisk.header();
    let ss = u64::from(sector);
    let mut partitions = Vec::new();
    let mut entries = Vec::new();
    for (&number, p) in gdisk.partitions() {
        if !p.is_used() {
            continue;
        }
        if p.last_lba < p.first_lba || (p.last_lba + 1) * ss > disk.len() {
            bail!(
                "GPT partition {number} ({}..{}) lies outside the {}-byte disk",
                p.first_lba,
                p.last_lba,
                disk.len()
            );
        }
        entries.push(GptPartition {
            number,
            type_guid: p.part_type_guid.guid.to_string(),
            unique_guid: p.part_guid.to_string(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            attributes: p.flags,
            name: p.name.clone(),
        });
        partitions.push(Extent {
            number,
            offset: p.first_lba * ss,
            size: (p.last_lba - p.first_lba + 1) * ss,
        });
    }
    partitions.sort_by_key(|e| e.offset);
    if let Some(w) = partitions
        .windows(2)
        .find(|w| w[0].offset + w[0].size > w[1].offset)
    {
        bail!(
            "GPT partitions {} and {} overlap: the partition table is damaged",
            w[0].number,
            w[1].number
        );
    }
    Ok(TableInfo {
        table: PartitionTable::Gpt(GptTable {
            disk_guid: h.disk_guid.to_string(),
            first_usable_lba: h.first_usable,
            last_usable_lba: h.last_usable,
            entries_lba: h.part_start,
            entry_count: h.num_parts,
            entry_size: h.part_size,
            partitions: entries,
        }),
        partitions,
    })
}

#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    bootable: bool,
    type_id: u8,
    start: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8]) -> Vec<MbrEntry> {
    (0..4)
        .map(|i| {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            MbrEntry {
                bootable: e[0] == 0x80,
                type_id: e[4],
                start: u64::from(u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"))),
                sectors: u64::from(u32::from_le_bytes(e[12..16].try_into().expect("4 bytes"))),
            }
        })
        .collect()
}

fn is_extended(type_id: u8) -> bool {
    matches!(type_id, 0x05 | 0x0f | 0x85)
}

fn read_msdos(disk: &Region, lba0: &[u8], sector: u32) -> Result<TableInfo> {
    let ss = u64::from(sector);
    let disk_sectors = disk.len() / ss;
    // A boot sector of a filesystem also ends in 55aa: only accept sane entries.
    let raw = mbr_entries(lba0);
    if lba0[446..510].chunks(16).any(|e| e[0] & 0x7f != 0) {
        return Ok(none());
    }
    let mut parts = Vec::new();
    let mut extents = Vec::new();
    for (i, e) in raw.iter().enumerate() {
        if e.type_id == 0 || e.sectors == 0 {
            continue;
        }
        if e.start == 0 || e.start + e.sectors > disk_sectors {
            return Ok(none());
        }
        let number = i as u32 + 1;
        parts.push(MsdosPartition {
            number,
            bootable: e.bootable,
            type_id: e.type_id,
            start_lba: e.start,
            sectors: e.sectors,
        });
        if is_extended(e.type_id) {
            read_logical(disk, e.start, e.sectors, ss, &mut parts, &mut extents)?;
        } else {
            extents.push(Extent {
                number,
                offset: e.start * ss,
                size: e.sectors * ss,
            });
        }
    }
    if parts.is_empty() {
        return Ok(none());
    }
    extents.sort_by_key(|e| e.offset);
    if extents
        .windows(2)
        .any(|w| w[0].offset + w[0].size > w[1].offset)
    {
        bail!("msdos partitions overlap: the partition table is damaged");
    }
    Ok(TableInfo {
        table: PartitionTable::Msdos(MsdosTable {
            disk_signature: u32::from_le_bytes(lba0[440..444].try_into().expect("4 bytes")),
            partitions: parts,
        }),
        partitions: extents,
    })
}

/// Follows the chain of extended boot records; logical partitions are numbered from 5.
fn read_logical(
    disk: &Region,
    ext_start: u64,
    ext_sectors: u64,
    ss: u64,
    parts: &mut Vec<MsdosPartition>,
    extents: &mut Vec<Extent>,
) -> Result<()> {
    let mut ebr = ext_start;
    let mut number = 5;
    for _ in 0..256 {
        let sector = disk
            .read_vec(ebr * ss, 512)
            .with_context(|| format!("reading the extended boot record at sector {ebr}"))?;
        if sector[510..512] != [0x55, 0xaa] {
            bail!("extended boot record at sector {ebr} is damaged (no 55aa signature)");
        }
        let entries = mbr_entries(&sector);
        let (logical, next) = (entries[0], entries[1]);
        if logical.type_id != 0 && logical.sectors != 0 {
            let start = ebr + logical.start;
            if start + logical.sectors > ext_start + ext_sectors {
                bail!("logical partition {number} extends beyond its extended partition");
            }
            parts.push(MsdosPartition {
                number,
                bootable: logical.bootable,
                type_id: logical.type_id,
                start_lba: start,
                sectors: logical.sectors,
            });
            extents.push(Extent {
                number,
                offset: start * ss,
                size: logical.sectors * ss,
            });
            number += 1;
        }
        if next.type_id == 0 || next.start == 0 {
            return Ok(());
        }
        ebr = ext_start + next.start;
        if ebr >= ext_start + ext_sectors {
            bail!("extended boot record chain points outside its extended partition");
        }
    }
    bail!("extended boot record chain is longer than 256 entries (a loop?)")
}
