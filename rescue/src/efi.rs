//! UEFI boot entries (efivarfs): after a restore, the machine's firmware gets an entry for
//! the restored system's loader, first in BootOrder, so it boots the restored disk even
//! with the rescue stick still attached and without relying on the removable-media path.
//!
//! Encodings from the UEFI specification: an EFI_LOAD_OPTION (attributes, device path
//! length, UTF-16 description, device path) whose device path is a hard drive node (GPT
//! partition number, start, size, unique GUID) followed by a file path node.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::firmware::{
    partition_file_path, BootEntry, LoadOption, PartitionFile, LOAD_OPTION_ACTIVE,
};
use bkimg_format::manifest::GptPartition;

/// EFI_GLOBAL_VARIABLE: the vendor GUID of Boot#### and BootOrder.
pub const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// Partition type of an EFI system partition.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// Non-volatile, boot service and runtime access.
const VAR_ATTRIBUTES: u32 = 0x7;

/// Loaders looked for on a restored EFI system partition, the first found wins: the
/// distributions' shim (Secure Boot) before their GRUB, the removable-media path last.
pub const LOADERS: &[&str] = &[
    "EFI/debian/shimx64.efi",
    "EFI/ubuntu/shimx64.efi",
    "EFI/redhat/shimx64.efi",
    "EFI/centos/shimx64.efi",
    "EFI/rocky/shimx64.efi",
    "EFI/almalinux/shimx64.efi",
    "EFI/fedora/shimx64.efi",
    "EFI/opensuse/shimx64.efi",
    "EFI/sles/shimx64.efi",
    "EFI/debian/grubx64.efi",
    "EFI/ubuntu/grubx64.efi",
    "EFI/redhat/grubx64.efi",
    "EFI/centos/grubx64.efi",
    "EFI/fedora/grubx64.efi",
    "EFI/systemd/systemd-bootx64.efi",
    "EFI/BOOT/BOOTX64.EFI",
];

/// An EFI_LOAD_OPTION booting `loader` ("EFI/debian/shimx64.efi") from GPT partition `p`
/// (its LBAs are in the disk's logical sectors, as the node wants them: a restore target
/// has the source's sector size).
pub fn load_option(description: &str, p: &GptPartition, loader: &str) -> Result<Vec<u8>> {
    load_option_with(
        description,
        LOAD_OPTION_ACTIVE,
        p,
        &format!("\\{}", loader.replace('/', "\\")),
        Vec::new(),
    )
}

/// The entry a restore point recorded (spec/format.md §7.6), rebuilt for partition `p` as
/// the restore wrote it.
pub fn recorded_option(e: &BootEntry, p: &GptPartition) -> Result<Vec<u8>> {
    let data = match &e.optional_data {
        Some(h) => hex::decode(h).map_err(|_| {
            anyhow!(
                "boot entry {:?} of the restore point has optional data that is not hex",
                e.description
            )
        })?,
        None => Vec::new(),
    };
    let attributes = if e.active { LOAD_OPTION_ACTIVE } else { 0 };
    load_option_with(&e.description, attributes, p, &e.path, data)
}

fn load_option_with(
    description: &str,
    attributes: u32,
    p: &GptPartition,
    path: &str,
    optional_data: Vec<u8>,
) -> Result<Vec<u8>> {
    let device_path = partition_file_path(&PartitionFile {
        partition: p.number,
        start_lba: p.first_lba,
        size_lba: p.last_lba - p.first_lba + 1,
        guid: p.unique_guid.clone(),
        path: path.to_string(),
    })
    .ok_or_else(|| anyhow!("partition {} has no valid GUID", p.number))?;
    Ok(LoadOption {
        attributes,
        description: description.to_string(),
        device_path,
        optional_data,
    }
    .encode())
}

/// The firmware's boot variables as efivarfs shows them.
pub struct BootVars {
    dir: PathBuf,
}

impl BootVars {
    pub fn new(efivars: &Path) -> BootVars {
        BootVars {
            dir: efivars.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{GLOBAL}"))
    }

    /// A variable's data (without the 4 attribute bytes efivarfs puts first).
    fn read(&self, name: &str) -> Option<Vec<u8>> {
        let raw = std::fs::read(self.path(name)).ok()?;
        raw.get(4..).map(<[u8]>::to_vec)
    }

    /// Writes a variable in one write(2), as efivarfs requires.
    fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let mut raw = VAR_ATTRIBUTES.to_le_bytes().to_vec();
        raw.extend(data);
        std::fs::write(self.path(name), raw)
            .with_context(|| format!("writing UEFI variable {name}"))
    }

    pub fn boot_order(&self) -> Vec<u16> {
        self.read("BootOrder")
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn entries(&self) -> Vec<u16> {
        let mut out = Vec::new();
        if let Ok(d) = std::fs::read_dir(&self.dir) {
            for e in d.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(n) = name
                    .strip_suffix(&format!("-{GLOBAL}"))
                    .and_then(|n| n.strip_prefix("Boot"))
                    .filter(|n| n.len() == 4)
                    .and_then(|n| u16::from_str_radix(n, 16).ok())
                {
                    out.push(n);
                }
            }
        }
        out.sort();
        out
    }

    /// Adds `option` as a boot entry (or finds the same one already there) and puts it
    /// first in BootOrder. Returns its number and the order before.
    pub fn add_first(&self, option: &[u8]) -> Result<(u16, Vec<u16>)> {
        let existing = self.entries();
        let number = match existing
            .iter()
            .find(|n| self.read(&format!("Boot{n:04X}")).as_deref() == Some(option))
        {
            Some(n) => *n,
            None => {
                let free = (0..=0xffffu16)
                    .find(|n| !existing.contains(n))
                    .ok_or_else(|| anyhow!("every Boot#### number is taken"))?;
                self.write(&format!("Boot{free:04X}"), option)?;
                free
            }
        };
        let before = self.boot_order();
        let mut order = vec![number];
        order.extend(before.iter().copied().filter(|n| *n != number));
        let bytes: Vec<u8> = order.iter().flat_map(|n| n.to_le_bytes()).collect();
        if before.first() != Some(&number) {
            self.write("BootOrder", &bytes)?;
        }
        if self.boot_order().first() != Some(&number) {
            bail!("the firmware did not keep the new BootOrder");
        }
        Ok((number, before))
    }
}

/// The loader on a mounted EFI system partition, as a path inside it.
pub fn find_loader(esp: &Path) -> Option<&'static str> {
    LOADERS.iter().copied().find(|l| esp.join(l).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> GptPartition {
        GptPartition {
            number: 1,
            type_guid: ESP_TYPE.to_uppercase(),
            unique_guid: "2F1A3C5E-0B4D-4E6F-8A9B-1C2D3E4F5A6B".into(),
            first_lba: 2048,
            last_lba: 133_119,
            attributes: 0,
            name: "EFI system".into(),
        }
    }

    #[test]
    fn load_option_layout() {
        let o = load_option("debian", &esp(), "EFI/debian/shimx64.efi").unwrap();
        assert_eq!(&o[..4], &1u32.to_le_bytes());
        let path_len = u16::from_le_bytes([o[4], o[5]]) as usize;
        let desc: Vec<u8> = "debian\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(&o[6..6 + desc.len()], desc.as_slice());
        let path = &o[6 + desc.len()..];
        assert_eq!(path.len(), path_len);
        // Hard drive node: partition 1 from LBA 2048, 131072 sectors, GPT.
        assert_eq!(&path[..4], &[4, 1, 42, 0]);
        assert_eq!(&path[4..8], &1u32.to_le_bytes());
        assert_eq!(&path[8..16], &2048u64.to_le_bytes());
        assert_eq!(&path[16..24], &131_072u64.to_le_bytes());
        assert_eq!(&path[40..42], &[2, 2]);
        // File node, then the end node.
        let file: Vec<u8> = "\\EFI\\debian\\shimx64.efi\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(&path[42..44], &[4, 4]);
        assert_eq!(
            u16::from_le_bytes([path[44], path[45]]) as usize,
            4 + file.len()
        );
        assert_eq!(&path[46..46 + file.len()], file.as_slice());
        assert_eq!(&path[path.len() - 4..], &[0x7f, 0xff, 4, 0]);
    }

    #[test]
    fn a_recorded_entry_is_rebuilt_for_the_restored_partition() {
        let e = BootEntry {
            number: 9,
            description: "debian".into(),
            active: false,
            booted: false,
            disk: "disk0".into(),
            partition: 1,
            partition_guid: esp().unique_guid.to_lowercase(),
            path: "\\EFI\\debian\\shimx64.efi".into(),
            optional_data: Some("2d2d6e6f".into()),
        };
        // Restored onto a layout where the partition starts elsewhere.
        let mut p = esp();
        p.first_lba = 4096;
        p.last_lba = 4096 + 999;
        let o = LoadOption::parse(&recorded_option(&e, &p).unwrap()).unwrap();
        assert_eq!(o.attributes, 0);
        assert_eq!(o.description, "debian");
        assert_eq!(o.optional_data, b"--no");
        let f = o.partition_file().unwrap();
        assert_eq!((f.start_lba, f.size_lba), (4096, 1000));
        assert_eq!(f.path, e.path);
        assert_eq!(f.guid, e.partition_guid);
    }

    #[test]
    fn a_new_entry_goes_first_and_the_same_one_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let vars = BootVars::new(dir.path());
        std::fs::write(
            dir.path().join(format!("Boot0000-{GLOBAL}")),
            [7u8, 0, 0, 0, 1, 0, 0, 0],
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("Boot0001-{GLOBAL}")),
            [7u8, 0, 0, 0, 2],
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("BootOrder-{GLOBAL}")),
            [7u8, 0, 0, 0, 1, 0, 0, 0],
        )
        .unwrap();
        let option = load_option("restored", &esp(), "EFI/debian/grubx64.efi").unwrap();
        let (n, before) = vars.add_first(&option).unwrap();
        assert_eq!((n, before), (2, vec![1, 0]));
        assert_eq!(vars.boot_order(), [2, 1, 0]);
        let raw = std::fs::read(dir.path().join(format!("Boot0002-{GLOBAL}"))).unwrap();
        assert_eq!(&raw[..4], &7u32.to_le_bytes());
        assert_eq!(&raw[4..], option.as_slice());
        // Again (the stick booted twice): the same entry, no duplicate.
        let (again, _) = vars.add_first(&option).unwrap();
        assert_eq!(again, 2);
        assert_eq!(vars.boot_order(), [2, 1, 0]);
    }

    #[test]
    fn loaders_prefer_shim_then_grub_then_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("EFI/BOOT")).unwrap();
        std::fs::write(dir.path().join("EFI/BOOT/BOOTX64.EFI"), b"x").unwrap();
        assert_eq!(find_loader(dir.path()), Some("EFI/BOOT/BOOTX64.EFI"));
        std::fs::create_dir_all(dir.path().join("EFI/debian")).unwrap();
        std::fs::write(dir.path().join("EFI/debian/grubx64.efi"), b"x").unwrap();
        assert_eq!(find_loader(dir.path()), Some("EFI/debian/grubx64.efi"));
        std::fs::write(dir.path().join("EFI/debian/shimx64.efi"), b"x").unwrap();
        assert_eq!(find_loader(dir.path()), Some("EFI/debian/shimx64.efi"));
        assert_eq!(find_loader(&dir.path().join("none")), None);
    }
}
