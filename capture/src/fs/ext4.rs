//! ext2/3/4 used-block map, read from the block bitmaps one group at a time.
//!
//! Everything the group bitmaps mark as allocated is used: data, metadata, journal,
//! superblock backups, descriptors, bitmaps and inode tables. A group whose bitmap was never
//! initialised (BLOCK_UNINIT) has its used blocks derived from the layout, as the kernel
//! does. Groups whose bitmap we cannot trust (bad checksum, count mismatch) are reported
//! whole.

use super::{
    coalesce, corrupt, crc16_update, crc32c_update, le16, le32, split_outcome, unsupported, Bail,
    FsInfo, Unsupported, UsedRanges,
};
use crate::region::Region;
use std::io;
use std::ops::Range;

const SB_OFFSET: u64 = 1024;
const SB_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;

const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

const COMPAT_EXCLUDE_INODE: u32 = 0x80;
const COMPAT_EXCLUDE_BITMAP: u32 = 0x100;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Incompat features whose effect on block allocation we understand. Notably absent:
/// COMPRESSION, RECOVER (journal not replayed: bitmaps may be stale) and JOURNAL_DEV.
const INCOMPAT_UNDERSTOOD: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_SPARSE_SUPER: u32 = 0x1;
const RO_GDT_CSUM: u32 = 0x10;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
/// All but HAS_SNAPSHOT (0x80) and REPLICA (0x800), whose effect on allocation is unknown.
const RO_UNDERSTOOD: u32 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | RO_GDT_CSUM
    | 0x20
    | 0x40
    | 0x100
    | RO_BIGALLOC
    | RO_METADATA_CSUM
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000;

// 0x1 is INODE_UNINIT, which says nothing about blocks.
const BG_BLOCK_UNINIT: u16 = 0x2;
const DESC_CHECKSUM_OFF: usize = 0x1E;
/// Largest flex_bg group we scan for metadata when deriving an uninitialised group's
/// bitmap; above it such groups are reported whole.
const MAX_FLEX_WINDOW: u64 = 1 << 16;

/// See [`super::used_ranges`]. `info` must describe this volume (its UUID is rechecked).
pub fn used_ranges(vol: &Region, info: &FsInfo) -> io::Result<Option<UsedRanges>> {
    Ok(used_ranges_or_reason(vol, info)?.ok())
}

/// Like [`used_ranges`] but says why a volume is refused.
pub(crate) fn used_ranges_or_reason(
    vol: &Region,
    info: &FsInfo,
) -> io::Result<Result<UsedRanges, Unsupported>> {
    split_outcome(check_and_map(vol, info))
}

fn check_and_map(vol: &Region, info: &FsInfo) -> Result<UsedRanges, Bail> {
    if vol.len() < SB_OFFSET + SB_SIZE as u64 {
        return unsupported("volume too small for an ext superblock");
    }
    let sb = vol.read_vec(SB_OFFSET, SB_SIZE)?;
    let layout = Layout::parse(&sb, vol.len())?;
    if !super::same_uuid(info, &layout.uuid) {
        return unsupported("UUID differs from the detected filesystem");
    }
    validate_descriptors(vol, &layout)?;
    let head = 0..2048u64.div_ceil(layout.block_size) * layout.block_size;
    // Bytes after the filesystem's end belong to something else (an md superblock, say).
    let tail = layout.blocks_count * layout.block_size..vol.len();
    let groups = GroupRuns {
        descs: DescReader::new(vol.clone(), layout.clone()),
        vol: vol.clone(),
        layout,
        next_group: 0,
        runs: Vec::new().into_iter(),
        window_meta: None,
    };
    let ranges = std::iter::once(Ok(head))
        .chain(groups)
        .chain(std::iter::once(Ok(tail)));
    Ok(coalesce(ranges, vol.len()))
}

#[derive(Clone, Debug)]
enum Checksum {
    None,
    /// gdt_csum: crc16 seeded with the filesystem UUID.
    Crc16([u8; 16]),
    /// metadata_csum: crc32c seeded with the checksum seed.
    Crc32c(u32),
}

#[derive(Clone, Debug)]
struct Layout {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    /// Blocks per bitmap bit (1 unless bigalloc).
    cluster_ratio: u64,
    group_count: u64,
    desc_size: usize,
    descs_per_block: u64,
    is_64bit: bool,
    flex_bg: bool,
    meta_bg: bool,
    first_meta_bg: u64,
    /// s_reserved_gdt_blocks: kept after every descriptor table copy for online resize.
    reserved_gdt_blocks: u64,
    /// Inode table blocks per group; None when the inode geometry is odd.
    inode_table_blocks: Option<u64>,
    /// Groups whose metadata may be packed together (1 without flex_bg); None when too
    /// many to scan.
    flex_window: Option<u64>,
    sparse_super: bool,
    /// Groups holding superblock backups under sparse_super2.
    backup_groups: Option<[u64; 2]>,
    checksum: Checksum,
    uuid: [u8; 16],
}

impl Layout {
    fn parse(sb: &[u8], vol_len: u64) -> Result<Layout, Bail> {
        if le16(sb, 0x38) != MAGIC {
            return unsupported("no ext superblock magic");
        }
        let state = le16(sb, 0x3A);
        if state & STATE_VALID == 0 || state & STATE_ERROR != 0 {
            return unsupported("filesystem not cleanly unmounted or has errors");
        }
        let rev_level = le32(sb, 0x4C);
        if rev_level > 1 {
            return unsupported(format!("unknown revision {rev_level}"));
        }
        let (compat, incompat, ro_compat) = if rev_level == 0 {
            (0, 0, 0)
        } else {
            (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64))
        };
        check_features(compat, incompat, ro_compat)?;
        let checksum = checksum_kind(sb, incompat, ro_compat)?;

        let log_block = le32(sb, 0x18);
        let log_cluster = le32(sb, 0x1C);
        if log_block > 6 {
            return unsupported("block size above 64 KiB");
        }
        let block_size = 1024u64 << log_block;
        let bigalloc = ro_compat & RO_BIGALLOC != 0;
        let cluster_ratio = cluster_ratio(log_block, log_cluster, bigalloc)?;

        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is_64bit { le32(sb, 0x150) } else { 0 };
        let blocks_count = (u64::from(blocks_hi) << 32) | u64::from(le32(sb, 0x04));
        let first_data_block = u64::from(le32(sb, 0x14));
        let expected_first = if block_size == 1024 && !bigalloc {
            1
        } else {
            0
        };
        if first_data_block != expected_first {
            return unsupported(format!("unexpected first data block {first_data_block}"));
        }
        if blocks_count <= first_data_block + 1 {
            return unsupported("filesystem has no blocks");
        }
        match blocks_count.checked_mul(block_size) {
            Some(bytes) if bytes <= vol_len => {}
            _ => return unsupported("filesystem larger than the volume"),
        }

        let blocks_per_group = u64::from(le32(sb, 0x20));
        let clusters_per_group = u64::from(le32(sb, 0x24));
        let bits_per_bitmap = block_size * 8;
        if clusters_per_group == 0
            || clusters_per_group > bits_per_bitmap
            || clusters_per_group % 8 != 0
            || blocks_per_group != clusters_per_group * cluster_ratio
        {
            return unsupported("odd blocks/clusters per group");
        }
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);

        let desc_size = if is_64bit {
            usize::from(le16(sb, 0xFE))
        } else {
            32
        };
        if desc_size < 32
            || (is_64bit && desc_size < 64)
            || !desc_size.is_power_of_two()
            || desc_size as u64 > block_size
        {
            return unsupported(format!("odd group descriptor size {desc_size}"));
        }

        let inode_size = if rev_level == 0 {
            128
        } else {
            u64::from(le16(sb, 0x58))
        };
        let inodes_per_group = u64::from(le32(sb, 0x28));
        let inode_table_blocks =
            (inode_size >= 128 && inode_size.is_power_of_two() && inode_size <= block_size)
                .then(|| (inodes_per_group * inode_size).div_ceil(block_size));
        let flex_bg = incompat & INCOMPAT_FLEX_BG != 0;
        let flex_window = if flex_bg {
            Some(1u64 << sb[0x174].min(63)).filter(|&w| w <= MAX_FLEX_WINDOW)
        } else {
            Some(1)
        };

        let sparse_super2 = compat & COMPAT_SPARSE_SUPER2 != 0;
        Ok(Layout {
            block_size,
            blocks_count,
            first_data_block,
            blocks_per_group,
            clusters_per_group,
            cluster_ratio,
            group_count,
            desc_size,
            descs_per_block: block_size / desc_size as u64,
            is_64bit,
            flex_bg,
            meta_bg: incompat & INCOMPAT_META_BG != 0,
            first_meta_bg: u64::from(le32(sb, 0x104)),
            reserved_gdt_blocks: if rev_level == 0 {
                0
            } else {
                u64::from(le16(sb, 0xCE))
            },
            inode_table_blocks,
            flex_window,
            sparse_super: ro_compat & RO_SPARSE_SUPER != 0,
            backup_groups: sparse_super2
                .then(|| [u64::from(le32(sb, 0x24C)), u64::from(le32(sb, 0x250))]),
            checksum,
            uuid: super::array16(sb, 0x68),
        })
    }

    /// Block holding the primary superblock.
    fn sb_block(&self) -> u64 {
        SB_OFFSET / self.block_size
    }

    fn group_first_block(&self, group: u64) -> u64 {
        self.first_data_block + group * self.blocks_per_group
    }

    fn group_block_count(&self, group: u64) -> u64 {
        (self.blocks_count - self.group_first_block(group)).min(self.blocks_per_group)
    }

    fn has_super(&self, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if let Some(backups) = self.backup_groups {
            return backups.contains(&group);
        }
        if group == 1 || !self.sparse_super {
            return true;
        }
        group % 2 == 1 && (is_power_of(group, 3) || is_power_of(group, 5) || is_power_of(group, 7))
    }

    /// Block holding group `group`'s descriptor, and the descriptor's offset in it.
    fn descriptor_location(&self, group: u64) -> (u64, usize) {
        let index = group / self.descs_per_block;
        let offset = (group % self.descs_per_block) as usize * self.desc_size;
        if !self.meta_bg || index < self.first_meta_bg {
            return (self.sb_block() + 1 + index, offset);
        }
        // meta_bg: each run of descs_per_block groups keeps its descriptors in its
        // first group, right after that group's superblock backup if it has one.
        let first = index * self.descs_per_block;
        let mut skip = u64::from(self.has_super(first));
        if self.block_size == 1024 && index == 0 && self.first_data_block == 0 {
            skip += 1;
        }
        (self.group_first_block(first) + skip, offset)
    }

    /// Blocks of `group` holding a superblock backup, descriptor table copy or reserved
    /// descriptor blocks: the union of what the kernel (ext4_num_base_meta_clusters) and
    /// e2fsprogs (ext2fs_reserve_super_and_bgd) count, as one run from the group's start.
    fn backup_blocks(&self, group: u64) -> Range<u64> {
        let first = self.group_first_block(group);
        // 1 KiB blocks with bigalloc: group 0 starts at block 0, its superblock is block 1.
        let sb = if group == 0 { self.sb_block() } else { first };
        let has_super = self.has_super(group);
        let count = if !self.meta_bg || group / self.descs_per_block < self.first_meta_bg {
            if has_super {
                let table = if self.meta_bg {
                    self.first_meta_bg
                } else {
                    self.group_count.div_ceil(self.descs_per_block)
                };
                // The kernel adds the reserved blocks even with meta_bg; e2fsprogs does
                // not. Taking the larger is safe: the free count check settles it.
                1 + table + self.reserved_gdt_blocks
            } else {
                0
            }
        } else {
            let pos = group % self.descs_per_block;
            let has_desc = pos == 0 || pos == 1 || pos == self.descs_per_block - 1;
            u64::from(has_super) + u64::from(has_desc)
        };
        if count == 0 {
            return first..first;
        }
        first..(sb + count).min(self.blocks_count)
    }

    /// Last block of the primary descriptor table (without meta_bg placement).
    fn primary_gdt_end(&self) -> u64 {
        let table_blocks = self.group_count.div_ceil(self.descs_per_block);
        let classic = if self.meta_bg {
            table_blocks.min(self.first_meta_bg)
        } else {
            table_blocks
        };
        self.sb_block() + 1 + classic
    }
}

fn is_power_of(n: u64, base: u64) -> bool {
    let mut power = base;
    while power < n {
        match power.checked_mul(base) {
            Some(next) => power = next,
            None => return false,
        }
    }
    power == n
}

fn check_features(compat: u32, incompat: u32, ro_compat: u32) -> Result<(), Bail> {
    if compat & (COMPAT_EXCLUDE_INODE | COMPAT_EXCLUDE_BITMAP) != 0 {
        return unsupported("snapshot exclude bitmaps");
    }
    let unknown = incompat & !INCOMPAT_UNDERSTOOD;
    if unknown != 0 {
        // Includes RECOVER: the journal holds changes the bitmaps do not show yet.
        return unsupported(format!("incompat features {unknown:#x}"));
    }
    let unknown = ro_compat & !RO_UNDERSTOOD;
    if unknown != 0 {
        return unsupported(format!("ro_compat features {unknown:#x}"));
    }
    Ok(())
}

fn checksum_kind(sb: &[u8], incompat: u32, ro_compat: u32) -> Result<Checksum, Bail> {
    if ro_compat & RO_METADATA_CSUM != 0 {
        if sb[0x175] != 1 {
            return unsupported("unknown checksum type");
        }
        if crc32c_update(!0, &sb[..0x3FC]) != le32(sb, 0x3FC) {
            return unsupported("superblock checksum mismatch");
        }
        let seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(sb, 0x270)
        } else {
            crc32c_update(!0, &sb[0x68..0x78])
        };
        return Ok(Checksum::Crc32c(seed));
    }
    if ro_compat & RO_GDT_CSUM != 0 {
        return Ok(Checksum::Crc16(super::array16(sb, 0x68)));
    }
    Ok(Checksum::None)
}

fn cluster_ratio(log_block: u32, log_cluster: u32, bigalloc: bool) -> Result<u64, Bail> {
    if !bigalloc {
        if log_cluster != log_block {
            return unsupported("cluster size differs from block size without bigalloc");
        }
        return Ok(1);
    }
    match log_cluster.checked_sub(log_block) {
        Some(shift) if log_cluster <= 16 + 10 => Ok(1u64 << shift),
        _ => unsupported("odd bigalloc cluster size"),
    }
}

#[derive(Debug)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
    free_clusters: u64,
    bitmap_checksum: u32,
}

/// Reads group descriptors, keeping only the current descriptor block in memory.
struct DescReader {
    vol: Region,
    layout: Layout,
    cached: Option<(u64, Vec<u8>)>,
}

impl DescReader {
    fn new(vol: Region, layout: Layout) -> Self {
        DescReader {
            vol,
            layout,
            cached: None,
        }
    }

    /// The descriptor of `group`, with its checksum verified.
    fn get(&mut self, group: u64) -> Result<Desc, Bail> {
        let (block, offset) = self.layout.descriptor_location(group);
        if block >= self.layout.blocks_count {
            return unsupported(format!("descriptor of group {group} beyond the filesystem"));
        }
        if self.cached.as_ref().map(|c| c.0) != Some(block) {
            let bs = self.layout.block_size;
            self.cached = Some((block, self.vol.read_vec(block * bs, bs as usize)?));
        }
        let raw = match &self.cached {
            Some((_, buf)) => &buf[offset..offset + self.layout.desc_size],
            None => return unsupported("descriptor cache empty"),
        };
        if !descriptor_checksum_ok(&self.layout, group, raw) {
            return unsupported(format!("group {group} descriptor checksum mismatch"));
        }
        Ok(parse_descriptor(&self.layout, raw))
    }
}

fn parse_descriptor(layout: &Layout, raw: &[u8]) -> Desc {
    let wide = layout.is_64bit;
    let hi32 = |off: usize| if wide { u64::from(le32(raw, off)) } else { 0 };
    let hi16 = |off: usize| if wide { u64::from(le16(raw, off)) } else { 0 };
    let csum_hi = if wide { u32::from(le16(raw, 0x38)) } else { 0 };
    Desc {
        block_bitmap: (hi32(0x20) << 32) | u64::from(le32(raw, 0x00)),
        inode_bitmap: (hi32(0x24) << 32) | u64::from(le32(raw, 0x04)),
        inode_table: (hi32(0x28) << 32) | u64::from(le32(raw, 0x08)),
        flags: le16(raw, 0x12),
        free_clusters: (hi16(0x2C) << 16) | u64::from(le16(raw, 0x0C)),
        bitmap_checksum: (csum_hi << 16) | u32::from(le16(raw, 0x18)),
    }
}

fn descriptor_checksum_ok(layout: &Layout, group: u64, raw: &[u8]) -> bool {
    descriptor_checksum(layout, group, raw).is_none_or(|c| c == le16(raw, DESC_CHECKSUM_OFF))
}

/// The checksum a descriptor should carry, None without descriptor checksums.
fn descriptor_checksum(layout: &Layout, group: u64, raw: &[u8]) -> Option<u16> {
    let group_le = (group as u32).to_le_bytes();
    let after = DESC_CHECKSUM_OFF + 2;
    Some(match &layout.checksum {
        Checksum::None => return None,
        Checksum::Crc32c(seed) => {
            let crc = crc32c_update(*seed, &group_le);
            let crc = crc32c_update(crc, &raw[..DESC_CHECKSUM_OFF]);
            let crc = crc32c_update(crc, &[0, 0]);
            let crc = crc32c_update(crc, &raw[after..]);
            crc as u16
        }
        Checksum::Crc16(uuid) => {
            let crc = crc16_update(!0, uuid);
            let crc = crc16_update(crc, &group_le);
            let crc = crc16_update(crc, &raw[..DESC_CHECKSUM_OFF]);
            if layout.is_64bit {
                crc16_update(crc, &raw[after..])
            } else {
                crc
            }
        }
    })
}

/// Checks every descriptor before the first range is produced, so a damaged table gives
/// "unsupported" rather than an error halfway through a capture.
fn validate_descriptors(vol: &Region, layout: &Layout) -> Result<(), Bail> {
    let mut descs = DescReader::new(vol.clone(), layout.clone());
    for group in 0..layout.group_count {
        let desc = descs.get(group)?;
        check_bitmap_location(layout, group, desc.block_bitmap)?;
    }
    Ok(())
}

fn check_bitmap_location(layout: &Layout, group: u64, bitmap: u64) -> Result<(), Bail> {
    if bitmap < layout.first_data_block || bitmap >= layout.blocks_count {
        return unsupported(format!(
            "group {group} bitmap {bitmap} outside the filesystem"
        ));
    }
    if bitmap <= layout.sb_block() || bitmap < layout.primary_gdt_end() {
        return unsupported(format!(
            "group {group} bitmap {bitmap} inside the superblock/GDT"
        ));
    }
    let first = layout.group_first_block(group);
    let inside_group = bitmap >= first && bitmap < first + layout.group_block_count(group);
    if !layout.flex_bg && !inside_group {
        return unsupported(format!("group {group} bitmap {bitmap} outside its group"));
    }
    Ok(())
}

/// The lazy per-group part of the map.
struct GroupRuns {
    vol: Region,
    layout: Layout,
    descs: DescReader,
    next_group: u64,
    runs: std::vec::IntoIter<Range<u64>>,
    /// Metadata block runs (bitmaps, inode tables) of every group in one flex window,
    /// keyed by window index; read when an uninitialised group of that window turns up.
    window_meta: Option<(u64, Vec<Range<u64>>)>,
}

impl Iterator for GroupRuns {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(run) = self.runs.next() {
                return Some(Ok(run));
            }
            if self.next_group >= self.layout.group_count {
                return None;
            }
            let group = self.next_group;
            self.next_group += 1;
            match self.group_ranges(group) {
                Ok(runs) => self.runs = runs.into_iter(),
                Err(e) => {
                    self.next_group = self.layout.group_count;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl GroupRuns {
    /// Used byte ranges of one group, ascending.
    fn group_ranges(&mut self, group: u64) -> io::Result<Vec<Range<u64>>> {
        let layout = &self.layout;
        let bs = layout.block_size;
        let first = layout.group_first_block(group);
        let blocks = layout.group_block_count(group);
        #[allow(clippy::single_range_in_vec_init)] // one range, not a list of numbers
        let whole = vec![first * bs..(first + blocks) * bs];

        let desc = self.descs.get(group).map_err(|b| b.into_io("ext4"))?;
        if check_bitmap_location(layout, group, desc.block_bitmap).is_err() {
            return Err(corrupt(format!(
                "ext4: group {group} bitmap pointer changed"
            )));
        }
        let clusters = blocks.div_ceil(layout.cluster_ratio) as usize;
        let bitmap = if desc.flags & BG_BLOCK_UNINIT != 0 {
            // Without group descriptor checksums the kernel ignores the flag and reads
            // the on-disk bitmap; we just keep the group whole.
            if matches!(layout.checksum, Checksum::None) {
                return Ok(whole);
            }
            match self.uninit_bitmap(group, &desc) {
                Ok(Some(bits)) => bits,
                Ok(None) => return Ok(whole),
                Err(b) => return Err(b.into_io("ext4")),
            }
        } else {
            let bitmap = self.vol.read_vec(desc.block_bitmap * bs, bs as usize)?;
            if !bitmap_trusted(layout, &desc, &bitmap, clusters) {
                return Ok(whole);
            }
            bitmap
        };
        let layout = &self.layout;
        let end = first + blocks;
        let ratio = layout.cluster_ratio;
        Ok(runs_of_ones(&bitmap, clusters)
            .into_iter()
            .map(|run| {
                let start = first + run.start as u64 * ratio;
                let stop = (first + run.end as u64 * ratio).min(end);
                start * bs..stop * bs
            })
            .collect())
    }
}

impl GroupRuns {
    /// The cluster bitmap of a BLOCK_UNINIT group, built the way the kernel
    /// (ext4_init_block_bitmap) and e2fsprogs (read_bitmaps) build it: superblock and
    /// descriptor backups, plus the block/inode bitmaps and inode tables lying in this
    /// group. Those are taken from every group of the flex window, not just this one.
    /// None (report the group whole) when the geometry is odd or the count of used
    /// clusters disagrees with the descriptor's free count. As the result holds at least
    /// what the kernel marks, an equal count means it is exactly the kernel's bitmap.
    fn uninit_bitmap(&mut self, group: u64, desc: &Desc) -> Result<Option<Vec<u8>>, Bail> {
        let layout = &self.layout;
        let (Some(table_blocks), Some(window)) = (layout.inode_table_blocks, layout.flex_window)
        else {
            return Ok(None);
        };
        let first = layout.group_first_block(group);
        let blocks = layout.group_block_count(group);
        let ratio = layout.cluster_ratio;
        let clusters = blocks.div_ceil(ratio);
        let mut bits = vec![0u8; clusters.div_ceil(8) as usize];
        let mut mark = |run: Range<u64>| {
            let start = run.start.max(first);
            let stop = run.end.min(first + blocks);
            if start < stop {
                for c in (start - first) / ratio..=(stop - 1 - first) / ratio {
                    bits[(c / 8) as usize] |= 1 << (c % 8);
                }
            }
        };
        mark(layout.backup_blocks(group));

        let index = group / window;
        if self.window_meta.as_ref().map(|w| w.0) != Some(index) {
            let lo = index * window;
            let hi = (lo + window).min(layout.group_count);
            let mut runs = Vec::with_capacity(3 * (hi - lo) as usize);
            for g in lo..hi {
                let d = self.descs.get(g)?;
                runs.push(d.block_bitmap..d.block_bitmap.saturating_add(1));
                runs.push(d.inode_bitmap..d.inode_bitmap.saturating_add(1));
                runs.push(d.inode_table..d.inode_table.saturating_add(table_blocks));
            }
            self.window_meta = Some((index, runs));
        }
        if let Some((_, runs)) = &self.window_meta {
            runs.iter().cloned().for_each(&mut mark);
        }
        // This group's own metadata (always inside the window, but say so).
        mark(desc.block_bitmap..desc.block_bitmap.saturating_add(1));
        mark(desc.inode_bitmap..desc.inode_bitmap.saturating_add(1));
        mark(desc.inode_table..desc.inode_table.saturating_add(table_blocks));

        let free = count_zeros(&bits, clusters as usize) as u64;
        Ok((free == desc.free_clusters).then_some(bits))
    }
}

/// A bitmap is trusted when its checksum (if any) matches and its free count agrees with
/// the descriptor's; otherwise the whole group is reported, which is always safe.
fn bitmap_trusted(layout: &Layout, desc: &Desc, bitmap: &[u8], clusters: usize) -> bool {
    if let Checksum::Crc32c(seed) = layout.checksum {
        let len = (layout.clusters_per_group / 8) as usize;
        let crc = crc32c_update(seed, &bitmap[..len]);
        let crc = if layout.is_64bit { crc } else { crc & 0xFFFF };
        if crc != desc.bitmap_checksum {
            return false;
        }
    }
    count_zeros(bitmap, clusters) as u64 == desc.free_clusters
}

fn bit_set(bits: &[u8], i: usize) -> bool {
    bits[i / 8] >> (i % 8) & 1 == 1
}

fn count_zeros(bits: &[u8], nbits: usize) -> usize {
    let whole = nbits / 8;
    let in_bytes: usize = bits[..whole].iter().map(|b| b.count_zeros() as usize).sum();
    in_bytes + (whole * 8..nbits).filter(|&i| !bit_set(bits, i)).count()
}

/// Runs of set bits among the first `nbits` bits (little-endian bit order).
fn runs_of_ones(bits: &[u8], nbits: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < nbits {
        let start = next_bit(bits, nbits, i, true);
        if start >= nbits {
            break;
        }
        let end = next_bit(bits, nbits, start, false);
        runs.push(start..end);
        i = end;
    }
    runs
}

/// First index at or after `i` whose bit equals `want`, or `nbits`.
fn next_bit(bits: &[u8], nbits: usize, mut i: usize, want: bool) -> usize {
    let skippable = if want { 0x00 } else { 0xFF };
    while i < nbits {
        if i & 7 == 0 && bits[i / 8] == skippable {
            i += 8;
            continue;
        }
        if bit_set(bits, i) == want {
            return i;
        }
        i += 1;
    }
    nbits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::testutil::*;
    use crate::fs::{detect, FsKind};
    use std::path::Path;

    #[test]
    fn bit_runs_and_counts() {
        let bits = [0b1111_0001u8, 0xFF, 0x00, 0b0000_0001];
        assert_eq!(runs_of_ones(&bits, 32), vec![0..1, 4..16, 24..25]);
        assert_eq!(runs_of_ones(&bits, 12), vec![0..1, 4..12]);
        assert_eq!(count_zeros(&bits, 32), 32 - 14);
        assert_eq!(count_zeros(&bits, 12), 3);
        assert_eq!(runs_of_ones(&[0xFF; 4], 32), vec![0..32]);
        assert!(runs_of_ones(&[0; 4], 32).is_empty());
    }

    #[test]
    fn sparse_super_groups() {
        let groups: Vec<u64> = (0..100)
            .filter(|&g| g < 2 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7))
            .collect();
        assert_eq!(groups, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
        assert!(!is_power_of(0, 3));
    }

    /// One group as dumpe2fs prints it.
    struct DumpGroup {
        first: u64,
        last: u64,
        block_uninit: bool,
        free: Vec<(u64, u64)>,
    }

    struct Dump {
        block_size: u64,
        cluster_size: u64,
        block_count: u64,
        groups: Vec<DumpGroup>,
    }

    fn field(line: &str, name: &str) -> Option<u64> {
        line.strip_prefix(name)?.trim().parse().ok()
    }

    fn dumpe2fs(image: &Path) -> Dump {
        let text = run("dumpe2fs", &[image.to_str().unwrap()]);
        let mut dump = Dump {
            block_size: 0,
            cluster_size: 0,
            block_count: 0,
            groups: Vec::new(),
        };
        for line in text.lines() {
            if let Some(v) = field(line, "Block size:") {
                dump.block_size = v;
            } else if let Some(v) = field(line, "Cluster size:") {
                dump.cluster_size = v;
            } else if let Some(v) = field(line, "Block count:") {
                dump.block_count = v;
            } else if line.starts_with("Group ") && line.contains("(Blocks ") {
                let span = line
                    .split("(Blocks ")
                    .nth(1)
                    .unwrap()
                    .split(')')
                    .next()
                    .unwrap();
                let (a, b) = span.split_once('-').unwrap();
                dump.groups.push(DumpGroup {
                    first: a.parse().unwrap(),
                    last: b.parse().unwrap(),
                    block_uninit: line.contains("BLOCK_UNINIT"),
                    free: Vec::new(),
                });
            } else if let Some(list) = line.strip_prefix("  Free blocks:") {
                let group = dump.groups.last_mut().unwrap();
                for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (a, b) = item.split_once('-').unwrap_or((item, item));
                    group.free.push((a.parse().unwrap(), b.parse().unwrap()));
                }
            }
        }
        assert!(dump.block_size > 0 && dump.block_count > 0 && !dump.groups.is_empty());
        dump
    }

    /// Our map must equal dumpe2fs's allocated blocks in every group, initialised or not
    /// (dumpe2fs derives an uninitialised group's bitmap from the layout, as we do).
    /// Returns how many groups were uninitialised and how many blocks dumpe2fs counts used.
    fn assert_matches_dumpe2fs(image: &Path, ranges: &[Range<u64>]) -> (usize, u64) {
        let dump = dumpe2fs(image);
        let bs = dump.block_size;
        // With bigalloc dumpe2fs names each free cluster by its first block.
        let ratio = (dump.cluster_size / bs).max(1);
        let mut ours = vec![false; dump.block_count as usize];
        for r in ranges {
            assert!(r.start % bs == 0 && r.end % bs == 0, "unaligned {r:?}");
            assert!(
                r.end / bs <= dump.block_count,
                "{r:?} beyond the filesystem"
            );
            for b in r.start / bs..r.end / bs {
                ours[b as usize] = true;
            }
        }
        assert!(ours[0], "block 0 (boot block / superblock) must be used");
        let mut uninit = 0;
        let mut used = 0;
        for g in &dump.groups {
            let mut expected = vec![true; (g.last - g.first + 1) as usize];
            for &(a, b) in &g.free {
                for blk in a..=(b + ratio - 1).min(g.last) {
                    expected[(blk - g.first) as usize] = false;
                }
            }
            let actual = &ours[g.first as usize..=g.last as usize];
            uninit += usize::from(g.block_uninit);
            used += expected.iter().filter(|&&u| u).count() as u64;
            let diff: Vec<(u64, bool)> = (0..expected.len())
                .filter(|&i| actual[i] != expected[i])
                .map(|i| (g.first + i as u64, actual[i]))
                .take(10)
                .collect();
            assert!(
                diff.is_empty(),
                "group at {} (uninit: {}) differs from dumpe2fs (block, ours): {diff:?}",
                g.first,
                g.block_uninit
            );
        }
        (uninit, used)
    }

    fn make_ext(tag: &str, mkfs: &str, args: &[&str], mib: u64) -> TempPath {
        let img = image(tag, mib);
        let mut full = vec!["-q", "-F", "-L", "bk-test"];
        full.extend_from_slice(args);
        full.push(img.as_str());
        run(mkfs, &full);
        img
    }

    /// Build, fill, map, compare with dumpe2fs, copy only the map, fsck and compare files.
    /// Returns the ranges and the used block count dumpe2fs reports (None when skipped).
    fn round_trip(
        tag: &str,
        mkfs: &str,
        args: &[&str],
        mib: u64,
        kind: FsKind,
    ) -> Option<(Vec<Range<u64>>, u64)> {
        if !tools_available(&[mkfs, "dumpe2fs", "e2fsck", "blkid", "mount"]) {
            return None;
        }
        let img = make_ext(tag, mkfs, args, mib);
        let files = {
            let m = mount(img.path(), "rw");
            populate(m.dir(), 400)
        };
        let vol = region(img.path());
        let info = detect(&vol).unwrap().expect("detected");
        assert_eq!(info.kind, kind);
        assert_matches_blkid(img.path(), &info);

        let ranges = match used_ranges_or_reason(&vol, &info).unwrap() {
            Ok(iter) => collect(iter),
            Err(why) => panic!("{tag}: unsupported: {why:?}"),
        };
        assert_shape(&ranges, vol.len());
        let (uninit, used) = assert_matches_dumpe2fs(img.path(), &ranges);
        eprintln!(
            "{tag}: {} ranges, {} of {} MiB used, {uninit} uninit groups",
            ranges.len(),
            total(&ranges) >> 20,
            vol.len() >> 20
        );
        assert!(total(&ranges) < vol.len(), "{tag}: nothing skipped");

        let copy = copy_ranges(img.path(), &ranges);
        let fsck = run_unchecked("e2fsck", &["-fn", copy.as_str()]);
        assert!(
            fsck.status.success(),
            "{tag}: e2fsck on the copy: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let m = mount(copy.path(), "ro");
        verify_files(m.dir(), &files);
        Some((ranges, used))
    }

    /// A larger default ext4 has many BLOCK_UNINIT groups; they must not be read whole.
    #[test]
    fn ext4_large_sparse_uninit_groups() {
        let mib = 6 << 10;
        let Some((ranges, used)) = round_trip("ext4-6g", "mkfs.ext4", &[], mib, FsKind::Ext4)
        else {
            return;
        };
        let bs = 4096;
        let mapped = total(&ranges);
        // Our map equals dumpe2fs group by group; outside the groups only the head
        // (inside group 0 here) and nothing past the end.
        assert!(
            mapped.abs_diff(used * bs) <= 2048,
            "mapped {mapped} vs dumpe2fs {}",
            used * bs
        );
        assert!(
            mapped < (mib << 20) / 8,
            "mapped {} MiB of {mib} MiB",
            mapped >> 20
        );
    }

    /// Layouts that put uninitialised groups in other places: bigalloc, sparse_super2,
    /// small and large flex groups (metadata spilling over several groups).
    #[test]
    fn ext4_uninit_group_layouts() {
        let cases: [(&str, &[&str], u64); 5] = [
            (
                "ext4-bigalloc-4g",
                &["-O", "bigalloc", "-C", "16384"],
                4 << 10,
            ),
            ("ext4-sparse2", &["-O", "sparse_super2"], 2 << 10),
            (
                "ext4-sparse2-1",
                &["-O", "sparse_super2", "-E", "num_backup_sb=1"],
                1 << 10,
            ),
            ("ext4-flex4-1k", &["-b", "1024", "-G", "4"], 256),
            (
                "ext4-flex64-1k",
                &["-b", "1024", "-G", "64", "-i", "2048"],
                512,
            ),
        ];
        for (tag, args, mib) in cases {
            round_trip(tag, "mkfs.ext4", args, mib, FsKind::Ext4);
        }
    }

    /// An uninitialised group whose free count disagrees with its layout is reported
    /// whole.
    #[test]
    fn uninit_group_with_wrong_free_count_is_whole() {
        if !tools_available(&["mkfs.ext4"]) {
            return;
        }
        let img = make_ext("ext4-uninit-count", "mkfs.ext4", &["-b", "4096"], 1024);
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        let layout = Layout::parse(&vol.read_vec(1024, 1024).unwrap(), vol.len())
            .unwrap_or_else(|_| panic!("parse"));
        let mut descs = DescReader::new(vol.clone(), layout.clone());
        let group = (0..layout.group_count)
            .find(|&g| {
                let d = descs.get(g).unwrap_or_else(|_| panic!("desc"));
                d.flags & BG_BLOCK_UNINIT != 0
            })
            .expect("an uninitialised group");
        let bs = layout.block_size;
        let span = layout.group_first_block(group) * bs
            ..(layout.group_first_block(group) + layout.group_block_count(group)) * bs;
        let covered = |ranges: &[Range<u64>]| {
            ranges
                .iter()
                .any(|r| r.start <= span.start && r.end >= span.end)
        };
        let ranges = collect(used_ranges(&vol, &info).unwrap().unwrap());
        assert!(!covered(&ranges), "group {group} whole before the patch");

        let (block, offset) = layout.descriptor_location(group);
        let pos = block * bs + offset as u64;
        let mut raw = read_bytes(img.path(), pos, layout.desc_size);
        let free = le16(&raw, 0x0C);
        raw[0x0C..0x0E].copy_from_slice(&(free - 1).to_le_bytes());
        let csum = descriptor_checksum(&layout, group, &raw).expect("checksums");
        raw[DESC_CHECKSUM_OFF..DESC_CHECKSUM_OFF + 2].copy_from_slice(&csum.to_le_bytes());
        patch(img.path(), pos, &raw);

        let ranges = collect(used_ranges(&region(img.path()), &info).unwrap().unwrap());
        assert!(covered(&ranges), "group {group} not whole after the patch");
    }

    #[test]
    fn ext4_default_4k() {
        round_trip("ext4-4k", "mkfs.ext4", &["-b", "4096"], 1024, FsKind::Ext4);
    }

    #[test]
    fn ext4_1k_blocks() {
        round_trip("ext4-1k", "mkfs.ext4", &["-b", "1024"], 128, FsKind::Ext4);
    }

    #[test]
    fn ext4_2k_blocks() {
        round_trip("ext4-2k", "mkfs.ext4", &["-b", "2048"], 128, FsKind::Ext4);
    }

    #[test]
    fn ext4_without_flex_bg() {
        round_trip(
            "ext4-noflex",
            "mkfs.ext4",
            &["-b", "4096", "-O", "^flex_bg"],
            256,
            FsKind::Ext4,
        );
    }

    #[test]
    fn ext4_64bit_and_32bit_descriptors() {
        round_trip(
            "ext4-64",
            "mkfs.ext4",
            &["-b", "4096", "-O", "64bit"],
            256,
            FsKind::Ext4,
        );
        round_trip(
            "ext4-32",
            "mkfs.ext4",
            &["-b", "4096", "-O", "^64bit"],
            256,
            FsKind::Ext4,
        );
    }

    #[test]
    fn ext4_meta_bg() {
        // 1 KiB blocks, 64 groups: four meta groups, whose descriptor blocks sit right at
        // the start of groups 16/32/48 (no backup there), or after the superblock backup
        // every group carries without sparse_super.
        let args = ["-b", "1024", "-O", "meta_bg,^resize_inode"];
        round_trip("ext4-metabg", "mkfs.ext4", &args, 512, FsKind::Ext4);
        let args = ["-b", "1024", "-O", "meta_bg,^resize_inode,^sparse_super"];
        round_trip(
            "ext4-metabg-nosparse",
            "mkfs.ext4",
            &args,
            512,
            FsKind::Ext4,
        );
    }

    #[test]
    fn ext4_bigalloc() {
        let args = ["-b", "4096", "-O", "bigalloc", "-C", "16384"];
        round_trip("ext4-bigalloc", "mkfs.ext4", &args, 256, FsKind::Ext4);
    }

    #[test]
    fn ext4_gdt_csum_and_csum_seed() {
        let crc16 = ["-b", "4096", "-O", "^metadata_csum,uninit_bg"];
        round_trip("ext4-crc16", "mkfs.ext4", &crc16, 256, FsKind::Ext4);
        let crc16_32 = ["-b", "1024", "-O", "^metadata_csum,^64bit,uninit_bg"];
        round_trip("ext4-crc16-32", "mkfs.ext4", &crc16_32, 128, FsKind::Ext4);
        let seed = ["-b", "4096", "-O", "metadata_csum_seed"];
        round_trip("ext4-seed", "mkfs.ext4", &seed, 256, FsKind::Ext4);
    }

    #[test]
    fn ext4_without_journal() {
        let args = ["-b", "4096", "-O", "^has_journal"];
        round_trip("ext4-nojournal", "mkfs.ext4", &args, 256, FsKind::Ext4);
    }

    #[test]
    fn ext3_and_ext2() {
        round_trip("ext3", "mkfs.ext3", &["-b", "4096"], 256, FsKind::Ext3);
        round_trip("ext2", "mkfs.ext2", &["-b", "1024"], 128, FsKind::Ext2);
    }

    fn reason(vol: &Region, info: &FsInfo) -> Option<String> {
        used_ranges_or_reason(vol, info).unwrap().err().map(|u| u.0)
    }

    fn patch(image: &Path, pos: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
        f.write_all_at(bytes, pos).unwrap();
    }

    fn read_bytes(image: &Path, pos: u64, len: usize) -> Vec<u8> {
        region(image).read_vec(pos, len).unwrap()
    }

    #[test]
    fn mounted_filesystem_is_refused() {
        if !tools_available(&["mkfs.ext4", "mount"]) {
            return;
        }
        let img = make_ext("ext4-mounted", "mkfs.ext4", &["-b", "4096"], 128);
        let m = mount(img.path(), "rw");
        std::fs::write(m.dir().join("f"), pattern(1, 100_000)).unwrap();
        run("sync", &[]);
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        let why = reason(&vol, &info).expect("a mounted ext4 must not be mapped");
        assert!(why.contains("0x4"), "{why}");
        drop(m);
        assert!(
            reason(&region(img.path()), &info).is_none(),
            "clean after umount"
        );
    }

    #[test]
    fn damaged_descriptor_or_wrong_volume_is_refused() {
        if !tools_available(&["mkfs.ext4"]) {
            return;
        }
        let img = make_ext("ext4-baddesc", "mkfs.ext4", &["-b", "4096"], 256);
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        assert!(reason(&vol, &info).is_none());

        // Volume shorter than the filesystem.
        let short = Region::new(vol.file().clone(), 0, vol.len() - 4096);
        assert!(reason(&short, &info)
            .unwrap()
            .contains("larger than the volume"));

        // Info of another filesystem.
        let mut other = info.clone();
        other.uuid = Some("00000000-0000-0000-0000-000000000001".into());
        assert!(reason(&vol, &other).unwrap().contains("UUID"));

        // Group 1's descriptor (block 1, 64-byte descriptors): bitmap pointer changed.
        let pos = 4096 + 64;
        let mut desc = read_bytes(img.path(), pos, 4);
        desc[0] ^= 0x40;
        patch(img.path(), pos, &desc);
        let why = reason(&region(img.path()), &info).unwrap();
        assert!(why.contains("checksum"), "{why}");
    }

    #[test]
    fn ext2_bitmap_pointer_outside_is_refused() {
        if !tools_available(&["mkfs.ext2"]) {
            return;
        }
        let img = make_ext("ext2-badptr", "mkfs.ext2", &["-b", "4096"], 256);
        patch(img.path(), 4096 + 32, &0x7FFF_FFFFu32.to_le_bytes());
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        let why = reason(&vol, &info).unwrap();
        assert!(why.contains("outside"), "{why}");
    }

    /// A damaged bitmap must not shrink the map: the group is then reported whole.
    #[test]
    fn damaged_bitmap_reports_whole_group() {
        if !tools_available(&["mkfs.ext4", "mkfs.ext2"]) {
            return;
        }
        for (tag, mkfs) in [("ext4-badbmp", "mkfs.ext4"), ("ext2-badbmp", "mkfs.ext2")] {
            let img = make_ext(tag, mkfs, &["-b", "4096"], 256);
            let vol = region(img.path());
            let info = detect(&vol).unwrap().unwrap();
            let layout = Layout::parse(&vol.read_vec(1024, 1024).unwrap(), vol.len())
                .unwrap_or_else(|_| panic!("parse"));
            let desc = DescReader::new(vol.clone(), layout.clone())
                .get(0)
                .unwrap_or_else(|_| panic!("desc"));
            // Clear the bits of blocks 0..8: now "free" yet holding the superblock.
            patch(img.path(), desc.block_bitmap * 4096, &[0]);
            let ranges = collect(used_ranges(&region(img.path()), &info).unwrap().unwrap());
            let group0 = 0..layout.blocks_per_group * 4096;
            assert!(
                ranges
                    .iter()
                    .any(|r| r.start <= group0.start && r.end >= group0.end),
                "{tag}: group 0 not whole: {:?}",
                &ranges[..2]
            );
        }
    }

    #[test]
    fn tiny_and_foreign_volumes_are_refused() {
        if !tools_available(&["mkfs.ext4"]) {
            return;
        }
        let img = image("ext4-tiny", 1);
        let vol = region(img.path());
        let info = FsInfo {
            kind: FsKind::Ext4,
            uuid: None,
            label: None,
            block_size: None,
        };
        assert!(reason(&vol, &info).unwrap().contains("magic"));
        let small = Region::new(vol.file().clone(), 0, 1500);
        assert!(reason(&small, &info).unwrap().contains("too small"));
    }
}
