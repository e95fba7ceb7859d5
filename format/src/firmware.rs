//! The captured machine's UEFI boot entries (spec/format.md §7.6), and the encodings they
//! are read from and written back in: EFI_LOAD_OPTION and the hard-drive + file-path device
//! path, as the UEFI specification defines them.
//!
//! Only entries that boot from an EFI system partition of a captured disk are recorded,
//! so that a restore can give the restored loader the entry it had, under the same name
//! and with the same arguments.

use serde::{Deserialize, Serialize};

/// The manifest member `firmware`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Firmware {
    /// In the captured machine's BootOrder order.
    pub uefi_boot_entries: Vec<BootEntry>,
}

/// One Boot#### variable of the captured machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootEntry {
    /// The #### of Boot####, on the captured machine.
    pub number: u16,
    pub description: String,
    /// LOAD_OPTION_ACTIVE was set.
    pub active: bool,
    /// BootCurrent named it: the captured system was booted through this entry.
    pub booted: bool,
    /// Disk of the restore point ("disk0") and GPT partition number the entry boots from.
    pub disk: String,
    pub partition: u32,
    /// The partition's unique GUID, as the entry names it.
    pub partition_guid: String,
    /// Loader path inside the partition, backslashes ("\EFI\debian\shimx64.efi").
    pub path: String,
    /// The entry's optional data (arguments to the loader), lowercase hex; absent when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_data: Option<String>,
}

pub const LOAD_OPTION_ACTIVE: u32 = 0x1;

/// An EFI_LOAD_OPTION: attributes, description, device path list, optional data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOption {
    pub attributes: u32,
    pub description: String,
    pub device_path: Vec<u8>,
    pub optional_data: Vec<u8>,
}

/// Where a device path leads: a GPT partition (its number, first LBA, size in sectors and
/// unique GUID) and a file in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionFile {
    pub partition: u32,
    pub start_lba: u64,
    pub size_lba: u64,
    pub guid: String,
    pub path: String,
}

impl LoadOption {
    /// Decodes a Boot#### variable's data; None when it is not a well-formed load option.
    pub fn parse(bytes: &[u8]) -> Option<LoadOption> {
        let attributes = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        let path_len = u16::from_le_bytes(bytes.get(4..6)?.try_into().ok()?) as usize;
        let (description, used) = utf16z_decode(bytes.get(6..)?)?;
        let path_start = 6 + used;
        let device_path = bytes.get(path_start..path_start + path_len)?.to_vec();
        let optional_data = bytes[path_start + path_len..].to_vec();
        Some(LoadOption {
            attributes,
            description,
            device_path,
            optional_data,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.attributes.to_le_bytes());
        out.extend((self.device_path.len() as u16).to_le_bytes());
        out.extend(utf16z(&self.description));
        out.extend(&self.device_path);
        out.extend(&self.optional_data);
        out
    }

    /// The partition and file the first device path of this option boots, when it names a
    /// GPT partition (possibly after hardware nodes, as firmware writes them) and a file.
    pub fn partition_file(&self) -> Option<PartitionFile> {
        let mut nodes = Nodes(&self.device_path);
        let hd = loop {
            let (kind, sub, body) = nodes.next()?;
            if (kind, sub) == (0x7f, 0xff) {
                return None;
            }
            if (kind, sub) == (4, 1) {
                break body;
            }
        };
        // Partition number, start, size, 16-byte signature, format 2 (GPT), type 2 (GUID).
        if hd.len() < 38 || hd[36] != 2 || hd[37] != 2 {
            return None;
        }
        let mut path = String::new();
        for (kind, sub, body) in nodes {
            match (kind, sub) {
                (4, 4) => {
                    let (part, _) = utf16z_decode(body)?;
                    if !path.is_empty() && !path.ends_with('\\') && !part.starts_with('\\') {
                        path.push('\\');
                    }
                    path.push_str(&part);
                }
                (0x7f, _) => break,
                _ => return None,
            }
        }
        if path.is_empty() {
            return None;
        }
        Some(PartitionFile {
            partition: u32::from_le_bytes(hd[0..4].try_into().ok()?),
            start_lba: u64::from_le_bytes(hd[4..12].try_into().ok()?),
            size_lba: u64::from_le_bytes(hd[12..20].try_into().ok()?),
            guid: guid_text(hd[20..36].try_into().ok()?),
            path,
        })
    }
}

/// A device path of one hard-drive node (GPT partition) and one file-path node.
pub fn partition_file_path(p: &PartitionFile) -> Option<Vec<u8>> {
    let guid = guid_bytes(&p.guid)?;
    let mut out = Vec::new();
    out.extend([4u8, 1]);
    out.extend(42u16.to_le_bytes());
    out.extend(p.partition.to_le_bytes());
    out.extend(p.start_lba.to_le_bytes());
    out.extend(p.size_lba.to_le_bytes());
    out.extend(guid);
    out.extend([2u8, 2]);
    let file = utf16z(&p.path);
    out.extend([4u8, 4]);
    out.extend(u16::try_from(4 + file.len()).ok()?.to_le_bytes());
    out.extend(file);
    out.extend([0x7fu8, 0xff, 4, 0]);
    Some(out)
}

/// Device path nodes: (type, subtype, body), ending at a malformed length.
struct Nodes<'a>(&'a [u8]);

impl<'a> Iterator for Nodes<'a> {
    type Item = (u8, u8, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let head = self.0.get(0..4)?;
        let len = u16::from_le_bytes([head[2], head[3]]) as usize;
        if len < 4 || len > self.0.len() {
            self.0 = &[];
            return None;
        }
        let item = (head[0], head[1], &self.0[4..len]);
        self.0 = &self.0[len..];
        Some(item)
    }
}

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

/// The textual form (lowercase) of a GUID stored as UEFI stores it.
pub fn guid_text(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(|u| u.to_le_bytes())
        .collect()
}

/// A NUL-terminated UTF-16LE string at the start of `b`, and the bytes it took.
fn utf16z_decode(b: &[u8]) -> Option<(String, usize)> {
    let mut units = Vec::new();
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let u = u16::from_le_bytes([pair[0], pair[1]]);
        if u == 0 {
            return Some((String::from_utf16_lossy(&units), 2 * (i + 1)));
        }
        units.push(u);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Boot#### as efibootmgr writes it for Debian's shim, bytes laid out by hand from
    /// the UEFI specification (not by this module's encoder).
    fn debian_shim() -> Vec<u8> {
        let mut v = vec![1, 0, 0, 0]; // active
        v.extend([98, 0]); // device path: hard drive 42 + file 4 + 2 * 24 + end 4
        for c in "debian".encode_utf16().chain([0]) {
            v.extend(c.to_le_bytes());
        }
        v.extend([4, 1, 42, 0]);
        v.extend([1, 0, 0, 0]); // partition 1
        v.extend([0, 8, 0, 0, 0, 0, 0, 0]); // start 2048
        v.extend([0, 0, 16, 0, 0, 0, 0, 0]); // 1048576 sectors
                                             // 5e3a1f2b-4c6d-4e8f-9a0b-1c2d3e4f5a6b, mixed endian
        v.extend([0x2b, 0x1f, 0x3a, 0x5e, 0x6d, 0x4c, 0x8f, 0x4e]);
        v.extend([0x9a, 0x0b, 0x1c, 0x2d, 0x3e, 0x4f, 0x5a, 0x6b]);
        v.extend([2, 2]);
        v.extend([4, 4, 52, 0]);
        for c in "\\EFI\\debian\\shimx64.efi".encode_utf16().chain([0]) {
            v.extend(c.to_le_bytes());
        }
        v.extend([0x7f, 0xff, 4, 0]);
        v
    }

    #[test]
    fn a_hand_made_entry_is_read_and_written_back_the_same() {
        let raw = debian_shim();
        let o = LoadOption::parse(&raw).unwrap();
        assert_eq!(o.attributes, LOAD_OPTION_ACTIVE);
        assert_eq!(o.description, "debian");
        assert!(o.optional_data.is_empty());
        let pf = o.partition_file().unwrap();
        assert_eq!(
            pf,
            PartitionFile {
                partition: 1,
                start_lba: 2048,
                size_lba: 1 << 20,
                guid: "5e3a1f2b-4c6d-4e8f-9a0b-1c2d3e4f5a6b".into(),
                path: "\\EFI\\debian\\shimx64.efi".into(),
            }
        );
        assert_eq!(partition_file_path(&pf).unwrap(), o.device_path);
        assert_eq!(o.encode(), raw);
    }

    #[test]
    fn hardware_nodes_before_the_partition_and_optional_data_are_kept() {
        let mut o = LoadOption::parse(&debian_shim()).unwrap();
        // PciRoot(0x0)/Pci(0x1,0x0) before the hard drive node, as firmware writes them.
        let mut path = vec![2, 1, 12, 0, 0xd0, 0x41, 0x03, 0x0a, 0, 0, 0, 0];
        path.extend([1, 1, 6, 0, 0, 1]);
        path.extend(&o.device_path);
        o.device_path = path;
        o.optional_data = b"quiet".to_vec();
        let again = LoadOption::parse(&o.encode()).unwrap();
        assert_eq!(again, o);
        assert_eq!(again.partition_file().unwrap().partition, 1);
    }

    #[test]
    fn entries_that_name_no_partition_file_or_are_cut_short_are_not_understood() {
        // A network boot entry: MAC node, end.
        let mut v = vec![1, 0, 0, 0, 12, 0, b'n', 0, 0, 0];
        v.extend([3, 11, 8, 0, 1, 2, 3, 4, 0x7f, 0xff, 4, 0]);
        assert_eq!(LoadOption::parse(&v).unwrap().partition_file(), None);
        let raw = debian_shim();
        assert_eq!(LoadOption::parse(&raw[..raw.len() - 10]), None);
        assert_eq!(LoadOption::parse(&raw[..7]), None);
    }

    #[test]
    fn guids_round_trip_mixed_endian() {
        let text = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let b = guid_bytes(text).unwrap();
        assert_eq!(&b[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(guid_text(&b), text);
        assert_eq!(guid_text(&guid_bytes(&text.to_uppercase()).unwrap()), text);
        assert_eq!(guid_bytes("not-a-guid"), None);
    }
}
