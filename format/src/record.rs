//! Prune records (spec/format.md §7.5): what stands for a pruned restore point that a
//! remaining point names as its parent. A pure codec, like the manifest's.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{FormatError, Result};
use crate::magic;
use crate::manifest::valid_id;
use crate::sealed::{self, Features, Kind};

pub const RECORD_KIND: Kind = Kind {
    name: "prune record",
    magic: magic::PRUNE_RECORD,
    version: 1,
    known_incompat: 0,
};

/// Stands for a pruned restore point that a remaining point names as its parent, so
/// that point's digest chain ends here instead of at a missing manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneRecord {
    pub id: String,
    /// SHA-256 of the pruned manifest file, as the child's parent link records it.
    pub manifest_sha256: String,
    /// When it was pruned (RFC 3339, UTC).
    pub pruned: String,
}

impl PruneRecord {
    pub fn encode(&self) -> Vec<u8> {
        sealed::seal(&RECORD_KIND, Features::default(), self)
    }

    pub fn decode(bytes: &[u8]) -> Result<PruneRecord> {
        let (record, _): (PruneRecord, Features) = sealed::open(&RECORD_KIND, bytes)?;
        if !valid_id(&record.id) {
            return Err(FormatError::corrupt("prune record", "its id is not valid"));
        }
        if Digest::from_hex(&record.manifest_sha256).is_none() {
            return Err(FormatError::corrupt(
                "prune record",
                "manifest_sha256 is not a digest",
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        let r = PruneRecord {
            id: "20261121T120000Z-abcdef".into(),
            manifest_sha256: Digest::of_bytes(b"m").to_hex(),
            pruned: "2026-11-21T12:00:00Z".into(),
        };
        let bytes = r.encode();
        assert_eq!(PruneRecord::decode(&bytes).unwrap(), r);
        let mut bad = bytes.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert!(matches!(
            PruneRecord::decode(&bad),
            Err(FormatError::Corrupt { .. })
        ));
    }
}
