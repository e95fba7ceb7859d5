//! The machine's UEFI boot entries that boot from a captured disk, read from efivarfs for
//! the manifest (spec/format.md §7.6).

use std::path::Path;

use bkimg_format::firmware::{BootEntry, Firmware, LoadOption, LOAD_OPTION_ACTIVE};
use bkimg_format::manifest::{Disk, PartitionTable};

/// EFI_GLOBAL_VARIABLE, the vendor GUID of Boot####, BootOrder and BootCurrent.
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// The entries of BootOrder whose device path names a GPT partition of one of `disks` (by
/// unique GUID), in BootOrder order; None when there are none (no UEFI, or the machine
/// does not boot from what was captured).
pub fn boot_entries(efivars: &Path, disks: &[Disk]) -> Option<Firmware> {
    let var = |name: &str| -> Option<Vec<u8>> {
        let raw = std::fs::read(efivars.join(format!("{name}-{GLOBAL}"))).ok()?;
        // efivarfs puts the 4 attribute bytes first.
        raw.get(4..).map(<[u8]>::to_vec)
    };
    let numbers = |b: Vec<u8>| -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let order = numbers(var("BootOrder")?);
    let current = var("BootCurrent")
        .map(numbers)
        .and_then(|n| n.first().copied());
    let mut entries = Vec::new();
    for number in order {
        let Some(option) = var(&format!("Boot{number:04X}")).and_then(|b| LoadOption::parse(&b))
        else {
            continue;
        };
        let Some(target) = option.partition_file() else {
            continue;
        };
        let found = disks.iter().find_map(|d| match &d.table {
            PartitionTable::Gpt(t) => t
                .partitions
                .iter()
                .find(|p| p.unique_guid.eq_ignore_ascii_case(&target.guid))
                .map(|p| (d.name.clone(), p.number)),
            _ => None,
        });
        let Some((disk, partition)) = found else {
            continue;
        };
        entries.push(BootEntry {
            number,
            description: option.description.clone(),
            active: option.attributes & LOAD_OPTION_ACTIVE != 0,
            booted: current == Some(number),
            disk,
            partition,
            partition_guid: target.guid.to_lowercase(),
            path: target.path,
            optional_data: (!option.optional_data.is_empty())
                .then(|| hex::encode(&option.optional_data)),
        });
    }
    (!entries.is_empty()).then_some(Firmware {
        uefi_boot_entries: entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkimg_format::firmware::{partition_file_path, PartitionFile};
    use bkimg_format::manifest::{GptPartition, GptTable};

    const ESP: &str = "2f1a3c5e-0b4d-4e6f-8a9b-1c2d3e4f5a6b";

    fn disk() -> Disk {
        Disk {
            name: "disk0".into(),
            source: "/dev/nvme0n1".into(),
            size: 1 << 30,
            logical_sector_size: 512,
            table: PartitionTable::Gpt(GptTable {
                disk_guid: "00000000-0000-4000-8000-000000000001".into(),
                first_usable_lba: 34,
                last_usable_lba: (1 << 21) - 34,
                entries_lba: 2,
                entry_count: 128,
                entry_size: 128,
                partitions: vec![GptPartition {
                    number: 1,
                    type_guid: "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".into(),
                    unique_guid: ESP.to_uppercase(),
                    first_lba: 2048,
                    last_lba: 206_847,
                    attributes: 0,
                    name: "EFI".into(),
                }],
            }),
            volumes: Vec::new(),
            tracking: None,
        }
    }

    fn option(description: &str, guid: &str, path: &str, attributes: u32, data: &[u8]) -> Vec<u8> {
        let pf = PartitionFile {
            partition: 1,
            start_lba: 2048,
            size_lba: 204_800,
            guid: guid.into(),
            path: path.into(),
        };
        LoadOption {
            attributes,
            description: description.into(),
            device_path: partition_file_path(&pf).unwrap(),
            optional_data: data.to_vec(),
        }
        .encode()
    }

    fn put(dir: &Path, name: &str, data: &[u8]) {
        let mut raw = vec![7, 0, 0, 0];
        raw.extend(data);
        std::fs::write(dir.join(format!("{name}-{GLOBAL}")), raw).unwrap();
    }

    #[test]
    fn entries_of_captured_disks_in_boot_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        put(
            d,
            "Boot0001",
            &option("debian", ESP, "\\EFI\\debian\\shimx64.efi", 1, b""),
        );
        // Another disk's entry: not recorded.
        put(
            d,
            "Boot0002",
            &option(
                "other",
                "11111111-2222-4333-8444-555555555555",
                "\\x.efi",
                1,
                b"",
            ),
        );
        put(
            d,
            "Boot0004",
            &option("fallback", ESP, "\\EFI\\BOOT\\BOOTX64.EFI", 0, b"ab"),
        );
        // Not in BootOrder: not recorded.
        put(d, "Boot0005", &option("stale", ESP, "\\old.efi", 1, b""));
        put(d, "BootOrder", &[4, 0, 2, 0, 1, 0]);
        put(d, "BootCurrent", &[1, 0]);
        let fw = boot_entries(d, &[disk()]).unwrap();
        let e = &fw.uefi_boot_entries;
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].number, e[0].active, e[0].booted), (4, false, false));
        assert_eq!(e[0].optional_data.as_deref(), Some("6162"));
        assert_eq!(e[1].number, 1);
        assert!(e[1].active && e[1].booted);
        assert_eq!(e[1].path, "\\EFI\\debian\\shimx64.efi");
        assert_eq!((e[1].disk.as_str(), e[1].partition), ("disk0", 1));
        assert_eq!(e[1].partition_guid, ESP);
    }

    #[test]
    fn no_uefi_or_no_matching_entry_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(boot_entries(dir.path(), &[disk()]), None);
        assert_eq!(boot_entries(&dir.path().join("absent"), &[disk()]), None);
        put(
            dir.path(),
            "Boot0000",
            &option(
                "other",
                "11111111-2222-4333-8444-555555555555",
                "\\x.efi",
                1,
                b"",
            ),
        );
        put(dir.path(), "BootOrder", &[0, 0]);
        assert_eq!(boot_entries(dir.path(), &[disk()]), None);
    }
}
