//! Restore-point manifests: what was captured, from where, and which index holds each
//! volume. The manifest is written last; its presence is what makes a restore point.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::Result;
use crate::magic;
use crate::sealed::{self, Features, Kind};

pub const KIND: Kind = Kind {
    name: "manifest",
    magic: magic::MANIFEST,
    version: 1,
    known_incompat: 0,
};

/// Compatible feature bit: the manifest records firmware boot entries (`firmware`).
pub const COMPAT_FIRMWARE: u32 = 0x1;
/// Compatible feature bit: the manifest says how consistent the capture is (`consistency`).
pub const COMPAT_CONSISTENCY: u32 = 0x2;
/// Compat feature bit: the manifest carries `sequence` (§7.8).
pub const COMPAT_SEQUENCE: u32 = 0x4;

/// Longest restore-point id accepted (ids are file names).
pub const MAX_ID_LEN: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub host: String,
    /// "bkimg VERSION" of the writer.
    pub tool: String,
    pub parent: Option<ParentRef>,
    pub chunk_size: u32,
    pub compression: CompressionInfo,
    pub disks: Vec<Disk>,
    /// The captured machine's UEFI boot entries for its captured disks (§7.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<crate::firmware::Firmware>,
    /// How consistent the captured disks are with one instant (§7.7): "frozen-snapshot",
    /// "snapshot", "offline" or "inconsistent"; absent in manifests of older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// Position in the repository's history (§7.8): one more than the largest of the
    /// restore points the writer saw; absent in manifests of older writers. Named
    /// `point_sequence` in the document, apart from a disk's tracking `sequence`.
    #[serde(
        default,
        rename = "point_sequence",
        skip_serializing_if = "Option::is_none"
    )]
    pub sequence: Option<u64>,
}

/// Link to the parent restore point: its id and the SHA-256 of its manifest file, so that
/// a changed ancestor is detected (digest chain).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    pub id: String,
    pub manifest_sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CompressionInfo {
    pub algorithm: String,
    pub level: i32,
}

/// One captured device: a whole disk with a partition table, or a single volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    /// Stable name within the restore point: "disk0", "disk1", ...
    pub name: String,
    /// Path it was read from (informational).
    pub source: String,
    pub size: u64,
    pub logical_sector_size: u32,
    pub table: PartitionTable,
    pub volumes: Vec<Volume>,
    /// Change tracking state the capture was taken at, when a change map was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PartitionTable {
    /// A single volume (filesystem or raw data) without a table.
    None,
    Gpt(GptTable),
    Msdos(MsdosTable),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GptTable {
    pub disk_guid: String,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub partitions: Vec<GptPartition>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based slot in the entry array (as Linux numbers partitions).
    pub number: u32,
    pub type_guid: String,
    pub unique_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MsdosTable {
    pub disk_signature: u32,
    pub partitions: Vec<MsdosPartition>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MsdosPartition {
    /// 1-4 primary, 5 and up logical (as Linux numbers them).
    pub number: u32,
    pub bootable: bool,
    pub type_id: u8,
    pub start_lba: u64,
    pub sectors: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tracking {
    pub generation: String,
    pub sequence: u64,
    /// Captures of this disk in a row, ending with this one, that used a change map
    /// instead of reading the disk (0: this one read it whole). Counts toward the
    /// periodic verification (spec/format.md §15.1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub changed_blocks_run: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Volume {
    /// Unique within its disk: "p1" (partition 1), "gap0" (bytes outside partitions),
    /// "whole" (a device without a partition table).
    pub name: String,
    pub role: VolumeRole,
    /// Partition number for partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Byte offset on the disk and size in bytes.
    pub offset: u64,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<Filesystem>,
    pub content: Content,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeRole {
    /// A partition from the table.
    Partition,
    /// Bytes outside every partition (boot code, gaps), table sectors included.
    Gap,
    /// A device without a partition table.
    Whole,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Filesystem {
    #[serde(rename = "type")]
    pub fs_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Content {
    /// Stored through an index.
    Data {
        index: String,
        /// How the blocks were chosen: "used-blocks" (filesystem allocation map) or "raw".
        mode: String,
        /// Bytes read from the source (used blocks, or all of it when raw).
        bytes_read: u64,
        /// Bytes in chunks that are not holes.
        bytes_data: u64,
        /// Compressed bytes of chunks this restore point stored new.
        bytes_stored_new: u64,
    },
    /// Swap space: not stored; restore writes a fresh swap header with this identity.
    Swap {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uuid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        page_size: u32,
    },
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let features = Features {
            incompat: 0,
            compat: if self.firmware.is_some() {
                COMPAT_FIRMWARE
            } else {
                0
            } | if self.consistency.is_some() {
                COMPAT_CONSISTENCY
            } else {
                0
            } | if self.sequence.is_some() {
                COMPAT_SEQUENCE
            } else {
                0
            },
        };
        sealed::seal(&KIND, features, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let (m, _): (Manifest, _) = sealed::open(&KIND, bytes)?;
        m.validate()?;
        Ok(m)
    }

    /// Checks what JSON parsing cannot: ids, digests, and that volumes lie inside their
    /// disk without overlapping, so no reader ever writes outside a target's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| crate::FormatError::corrupt("manifest", d);
        if !valid_id(&self.id) {
            return Err(bad(format!("invalid restore point id {:?}", self.id)));
        }
        if crate::time::parse(&self.created).is_none() {
            return Err(bad(format!(
                "invalid capture time {:?} (not an RFC 3339 time)",
                self.created
            )));
        }
        if let Some(p) = &self.parent {
            if !valid_id(&p.id) || Digest::from_hex(&p.manifest_sha256).is_none() {
                return Err(bad(format!("invalid parent link {:?}", p.id)));
            }
        }
        if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return Err(bad(format!("chunk size {} out of range", self.chunk_size)));
        }
        for d in &self.disks {
            let mut end = 0u64;
            for v in &d.volumes {
                let v_end = v.offset.checked_add(v.size);
                if v.size == 0 || v.offset < end || v_end.is_none_or(|e| e > d.size) {
                    return Err(bad(format!(
                        "volume {} of {} ({} bytes at {}) overlaps another or lies outside the {}-byte disk",
                        v.name, d.name, v.size, v.offset, d.size
                    )));
                }
                end = v_end.expect("checked");
                if let Content::Data { index, .. } = &v.content {
                    if Digest::from_hex(index).is_none() {
                        return Err(bad(format!(
                            "volume {} has an invalid index id {index:?}",
                            v.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every volume with its index (None for swap), in order. Index ids were checked by
    /// `validate`.
    pub fn indexes(&self) -> impl Iterator<Item = (&Disk, &Volume, Option<Digest>)> {
        self.disks.iter().flat_map(|d| {
            d.volumes.iter().map(move |v| {
                let idx = match &v.content {
                    Content::Data { index, .. } => Digest::from_hex(index),
                    Content::Swap { .. } => None,
                };
                (d, v, idx)
            })
        })
    }
}

/// Ids are file names: ASCII letters, digits, '-', '_' and '.', not starting with '.'.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tracking_tests {
    use super::Tracking;

    /// `changed_blocks_run` is written only when non-zero, so manifests of captures that
    /// read their disks stay as before, and read as 0 when absent (older writers).
    #[test]
    fn changed_blocks_run_is_optional() {
        let t: Tracking = serde_json::from_str(
            r#"{"generation": "00112233445566778899aabbccddeeff", "sequence": 7}"#,
        )
        .unwrap();
        assert_eq!(t.changed_blocks_run, 0);
        assert!(!serde_json::to_string(&t)
            .unwrap()
            .contains("changed_blocks_run"));
        let t = Tracking {
            changed_blocks_run: 3,
            ..t
        };
        let text = serde_json::to_string(&t).unwrap();
        assert!(text.contains(r#""changed_blocks_run":3"#), "{text}");
        assert_eq!(serde_json::from_str::<Tracking>(&text).unwrap(), t);
    }
}
