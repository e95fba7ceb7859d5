//! UEFI boot entries (efivarfs): after a restore, the machine's firmware gets an entry for
//! the restored system's loader, first in BootOrder, so it boots the restored disk even
//! with the rescue stick still attached and without relying on the removable-media path.
//!
//! Encodings from the UEFI specification: an EFI_LOAD_OPTION (attributes, device path
//! length, UTF-16 description, device path) whose device path is a hard drive node (GPT
//! partition number, start, size, unique GUID) followed by a file path node.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bkimg_format::manifest::GptPartition;

/// EFI_GLOBAL_VARIABLE: the vendor GUID of Boot#### and BootOrder.
pub const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// Partition type of an EFI system partition.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// Non-volatile, boot service and runtime access.
const VAR_ATTRIBUTES: u32 = 0x7;
const LOAD_OPTION_ACTIVE: u32 = 0x1;

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

/// The 16 bytes of a GUID as UEFI stores them (first three fields little-endian).
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let raw = hex::decode(hex).ok()?;
    let mut out = [0u8; 16];
    for (i, j) in [3, 2, 1, 0, 5, 4, 7, 6].iter().enumerate() {
        out[i] = raw[*j];
    }
    out[8..].copy_from_slice(&raw[8..]);
    Some(out)
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(|u| u.to_le_bytes())
        .collect()
}

/// An EFI_LOAD_OPTION booting `loader` ("EFI/debian/shimx64.efi") from GPT partition `p`
/// (its LBAs are in the disk's logical sectors, as the node wants them: a restore target
/// has the source's sector size).
pub fn load_option(description: &str, p: &GptPartition, loader: &str) -> Result<Vec<u8>> {
    let guid = guid_bytes(&p.unique_guid)
        .ok_or_else(|| anyhow!("partition {} has no valid GUID", p.number))?;
    let mut path = Vec::new();
    // Hard drive media device path: type 4, subtype 1, 42 bytes.
    path.extend([4u8, 1]);
    path.extend(42u16.to_le_bytes());
    path.extend(p.number.to_le_bytes());
    path.extend(p.first_lba.to_le_bytes());
    path.extend((p.last_lba - p.first_lba + 1).to_le_bytes());
    path.extend(guid);
    path.extend([2u8, 2]); // GPT, GUID signature
                           // File path media device path: type 4, subtype 4, backslashes.
    let file = utf16z(&format!("\\{}", loader.replace('/', "\\")));
    path.extend([4u8, 4]);
    path.extend(u16::try_from(4 + file.len())?.to_le_bytes());
    path.extend(file);
    // End of the device path.
    path.extend([0x7fu8, 0xff, 4, 0]);
    let mut out = Vec::new();
    out.extend(LOAD_OPTION_ACTIVE.to_le_bytes());
    out.extend(u16::try_from(path.len())?.to_le_bytes());
    out.extend(utf16z(description));
    out.extend(path);
    Ok(out)
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
    fn guids_are_mixed_endian() {
        let g = guid_bytes("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
        assert_eq!(
            g,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(guid_bytes("not-a-guid"), None);
    }

    #[test]
    fn load_option_layout() {
        let o = load_option("debian", &esp(), "EFI/debian/shimx64.efi").unwrap();
        assert_eq!(&o[..4], &1u32.to_le_bytes());
        let path_len = u16::from_le_bytes([o[4], o[5]]) as usize;
        let desc = utf16z("debian");
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
        let file = utf16z("\\EFI\\debian\\shimx64.efi");
        assert_eq!(&path[42..44], &[4, 4]);
        assert_eq!(
            u16::from_le_bytes([path[44], path[45]]) as usize,
            4 + file.len()
        );
        assert_eq!(&path[46..46 + file.len()], file.as_slice());
        assert_eq!(&path[path.len() - 4..], &[0x7f, 0xff, 4, 0]);
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
