//! Placeholder until the filesystem probes land: recognises nothing, so every volume is
//! captured raw (correct, only larger).
use crate::region::Region;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Vfat,
    Swap,
    Luks,
    LvmPv,
    Btrfs,
    Unknown,
}
impl FsKind {
    pub fn name(&self) -> &'static str {
        "unknown"
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    pub kind: FsKind,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub block_size: Option<u32>,
}
pub fn detect(_vol: &Region) -> std::io::Result<Option<FsInfo>> {
    Ok(None)
}
#[allow(clippy::type_complexity)]
pub fn used_ranges(
    _vol: &Region,
    _info: &FsInfo,
) -> std::io::Result<Option<Box<dyn Iterator<Item = std::io::Result<std::ops::Range<u64>>> + Send>>>
{
    Ok(None)
}
