//! XFS used-block map: each allocation group minus the extents of its by-block-number
//! free-space btree, walked leaf by leaf.
//!
//! Only a filesystem whose log needs no recovery that could change the free-space trees
//! is mapped: with a dirty log the on-disk trees can be older than allocations already
//! committed (and data already written), so the map would lose data after log recovery.
//! Two logs qualify: one that ends in an unmount record (unmounted cleanly), and one whose
//! records from tail to head only rewrite the superblock, which is what freezing leaves
//! (XFS writes everything back, then covers the log with dummy superblock transactions):
//! so a frozen filesystem, as a live snapshot sees it, is mapped too.

use super::{
    be16, be32, be64, coalesce, crc32c_skipping, le32, split_outcome, unsupported, Bail, FsInfo,
    Unsupported, UsedRanges,
};
use crate::region::Region;
use std::io;
use std::ops::Range;

const SB_MAGIC: &[u8; 4] = b"XFSB";
const AGF_MAGIC: &[u8; 4] = b"XAGF";
const BNOBT_MAGIC_V4: &[u8; 4] = b"ABTB";
const BNOBT_MAGIC_V5: &[u8; 4] = b"AB3B";
const NULL_AGBLOCK: u32 = u32::MAX;

const SB_CRC_OFF: usize = 224;
const AGF_CRC_OFF: usize = 216;
const BTREE_CRC_OFF: usize = 52;
const BTREE_HDR_V4: usize = 16;
const BTREE_HDR_V5: usize = 56;
/// Far above what a 2^31-block AG can need even with minimal fan-out.
const MAX_BTREE_LEVELS: u32 = 9;

const VERSION_LOGV2: u16 = 0x0400;
// v5 incompat: ftype, sparse inodes, meta_uuid, bigtime, nrext64, exchange-range, parent
// pointers. Not: needsrepair (0x10), metadir (0x100), zoned (0x200) or anything newer.
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_UNDERSTOOD: u32 = 0x1 | 0x2 | INCOMPAT_META_UUID | 0x8 | 0x20 | 0x40 | 0x80;
// finobt, rmapbt, reflink, inobtcount: none changes how free space is recorded.
const RO_COMPAT_UNDERSTOOD: u32 = 0x1 | 0x2 | 0x4 | 0x8;

const LOG_MAGIC: u32 = 0xFEED_BABE;
const BB: u64 = 512;
const LOG_HEADER_CYCLE_SIZE: u64 = 32 * 1024;
const LOG_UNMOUNT_TRANS: u8 = 0x20;
const LOG_SCAN_CHUNK_BBS: u64 = 2048;

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
    let geo = Geometry::read(vol)?;
    if !super::same_uuid(info, &geo.uuid) {
        return unsupported("UUID differs from the detected filesystem");
    }
    // Cheap checks first, so damage usually means "capture raw" rather than a failed
    // capture: every AGF, the path to every AG's first free-space leaf, and the whole
    // walk of AGs whose tree is that single leaf.
    for ag in 0..geo.ag_count {
        let mut walk = AgWalk::start(vol, &geo, ag)?;
        if walk.leaf.right == NULL_AGBLOCK {
            while walk.next_used(vol, &geo)?.is_some() {}
        }
    }
    if !log_is_clean(vol, &geo)? {
        return unsupported("log holds changes not yet in place (mounted, crashed or shut down)");
    }
    // Bytes after the filesystem's end belong to something else (an md superblock, say).
    let tail = geo.dblocks * geo.block_size..vol.len();
    let runs = AgRuns {
        vol: vol.clone(),
        geo,
        next_ag: 0,
        walk: None,
    };
    Ok(coalesce(runs.chain(std::iter::once(Ok(tail))), vol.len()))
}

#[derive(Clone, Debug)]
struct Geometry {
    block_size: u64,
    sect_size: u64,
    dblocks: u64,
    ag_blocks: u64,
    ag_count: u64,
    crc: bool,
    uuid: [u8; 16],
    /// UUID stamped in v5 metadata blocks (differs from `uuid` with meta_uuid).
    block_uuid: [u8; 16],
    logv2: bool,
    log_ag: u64,
    log_agbno: u64,
    log_blocks: u64,
}

impl Geometry {
    fn read(vol: &Region) -> Result<Geometry, Bail> {
        if vol.len() < BB {
            return unsupported("volume too small for XFS");
        }
        let first = vol.read_vec(0, BB as usize)?;
        let sect_size = u64::from(be16(&first, 102));
        if !(512..=32768).contains(&sect_size) || !sect_size.is_power_of_two() {
            return unsupported("odd sector size");
        }
        if vol.len() < sect_size {
            return unsupported("volume smaller than one sector");
        }
        let sb = vol.read_vec(0, sect_size as usize)?;
        Geometry::parse(&sb, vol.len())
    }

    fn parse(sb: &[u8], vol_len: u64) -> Result<Geometry, Bail> {
        if &sb[0..4] != SB_MAGIC {
            return unsupported("no XFS superblock magic");
        }
        let version = be16(sb, 100);
        let crc = match version & 0xF {
            5 => true,
            4 => false,
            v => return unsupported(format!("XFS superblock version {v}")),
        };
        if sb[126] != 0 {
            return unsupported("mkfs did not finish (sb_inprogress)");
        }
        if crc {
            check_v5_features(sb)?;
        }
        let geo = Geometry {
            block_size: u64::from(be32(sb, 4)),
            sect_size: u64::from(be16(sb, 102)),
            dblocks: be64(sb, 8),
            ag_blocks: u64::from(be32(sb, 84)),
            ag_count: u64::from(be32(sb, 88)),
            crc,
            uuid: super::array16(sb, 32),
            block_uuid: if crc && be32(sb, 216) & INCOMPAT_META_UUID != 0 {
                super::array16(sb, 248)
            } else {
                super::array16(sb, 32)
            },
            logv2: crc || version & VERSION_LOGV2 != 0,
            log_ag: 0,
            log_agbno: 0,
            log_blocks: u64::from(be32(sb, 96)),
        };
        geo.check_sizes(sb, vol_len)?;
        geo.with_log(be64(sb, 48), sb[124])
    }

    fn check_sizes(&self, sb: &[u8], vol_len: u64) -> Result<(), Bail> {
        let bs = self.block_size;
        if !(512..=65536).contains(&bs)
            || !bs.is_power_of_two()
            || u64::from(sb[120]) != u64::from(bs.trailing_zeros())
            || u64::from(sb[121]) != u64::from(self.sect_size.trailing_zeros())
            || self.sect_size > bs
        {
            return unsupported("odd block or sector size");
        }
        if self.ag_count == 0 || self.ag_blocks < 16 || self.ag_blocks > u64::from(u32::MAX) {
            return unsupported("odd AG geometry");
        }
        let full_ags = (self.ag_count - 1) * self.ag_blocks;
        if self.dblocks <= full_ags || self.dblocks > full_ags + self.ag_blocks {
            return unsupported("data block count does not match AG geometry");
        }
        if u64::from(sb[124]) != ceil_log2(self.ag_blocks) {
            return unsupported("sb_agblklog does not match sb_agblocks");
        }
        match self.dblocks.checked_mul(bs) {
            Some(bytes) if bytes <= vol_len => Ok(()),
            _ => unsupported("filesystem larger than the volume"),
        }
    }

    /// Places the internal log; `logstart` is an AG-encoded filesystem block number.
    fn with_log(mut self, logstart: u64, ag_blk_log: u8) -> Result<Geometry, Bail> {
        if logstart == 0 {
            // The log is on another device we cannot check for cleanliness.
            return unsupported("external log");
        }
        self.log_ag = logstart >> ag_blk_log;
        self.log_agbno = logstart & ((1u64 << ag_blk_log) - 1);
        if self.log_ag >= self.ag_count
            || self.log_blocks == 0
            || self.log_agbno + self.log_blocks > self.ag_len(self.log_ag)
        {
            return unsupported("internal log outside its AG");
        }
        Ok(self)
    }

    fn ag_len(&self, ag: u64) -> u64 {
        (self.dblocks - ag * self.ag_blocks).min(self.ag_blocks)
    }

    fn byte_of(&self, ag: u64, agbno: u64) -> u64 {
        (ag * self.ag_blocks + agbno) * self.block_size
    }

    /// Blocks at the start of every AG taken by the sb, AGF, AGI and AGFL sectors.
    fn header_blocks(&self) -> u64 {
        (4 * self.sect_size).div_ceil(self.block_size)
    }

    fn btree_header_len(&self) -> usize {
        if self.crc {
            BTREE_HDR_V5
        } else {
            BTREE_HDR_V4
        }
    }

    fn max_records(&self, level: u16) -> usize {
        let space = self.block_size as usize - self.btree_header_len();
        // Leaves hold (start, count) records; nodes hold the same keys plus a pointer.
        if level == 0 {
            space / 8
        } else {
            space / 12
        }
    }
}

fn ceil_log2(n: u64) -> u64 {
    u64::from(64 - (n - 1).leading_zeros())
}

fn check_v5_features(sb: &[u8]) -> Result<(), Bail> {
    if crc32c_skipping(sb, SB_CRC_OFF) != le32(sb, SB_CRC_OFF) {
        return unsupported("superblock checksum mismatch");
    }
    let ro_compat = be32(sb, 212);
    let incompat = be32(sb, 216);
    let log_incompat = be32(sb, 220);
    if incompat & !INCOMPAT_UNDERSTOOD != 0 {
        return unsupported(format!("incompat features {incompat:#x}"));
    }
    if ro_compat & !RO_COMPAT_UNDERSTOOD != 0 {
        return unsupported(format!("ro_compat features {ro_compat:#x}"));
    }
    if log_incompat != 0 {
        return unsupported("log incompat features set (log in use)");
    }
    Ok(())
}

/// The fields of an AGF that the walk needs, validated.
struct Agf {
    length: u64,
    bno_root: u32,
    bno_levels: u32,
    free_blocks: u64,
}

fn read_agf(vol: &Region, geo: &Geometry, ag: u64) -> Result<Agf, Bail> {
    let buf = vol.read_vec(geo.byte_of(ag, 0) + geo.sect_size, geo.sect_size as usize)?;
    if &buf[0..4] != AGF_MAGIC || be32(&buf, 4) != 1 || u64::from(be32(&buf, 8)) != ag {
        return unsupported(format!("AG {ag}: bad AGF header"));
    }
    if geo.crc
        && (crc32c_skipping(&buf, AGF_CRC_OFF) != le32(&buf, AGF_CRC_OFF)
            || super::array16(&buf, 64) != geo.block_uuid)
    {
        return unsupported(format!("AG {ag}: AGF checksum or UUID mismatch"));
    }
    let agf = Agf {
        length: u64::from(be32(&buf, 12)),
        bno_root: be32(&buf, 16),
        bno_levels: be32(&buf, 28),
        free_blocks: u64::from(be32(&buf, 52)),
    };
    if agf.length != geo.ag_len(ag) || agf.free_blocks > agf.length {
        return unsupported(format!("AG {ag}: AGF length or free count inconsistent"));
    }
    if !(1..=MAX_BTREE_LEVELS).contains(&agf.bno_levels) {
        return unsupported(format!("AG {ag}: bnobt has {} levels", agf.bno_levels));
    }
    Ok(agf)
}

/// A validated bnobt block.
struct BtreeBlock {
    buf: Vec<u8>,
    agbno: u32,
    records: usize,
    left: u32,
    right: u32,
}

fn read_btree_block(
    vol: &Region,
    geo: &Geometry,
    ag: u64,
    agbno: u32,
    level: u16,
) -> Result<BtreeBlock, Bail> {
    let where_ = format!("AG {ag} bnobt block {agbno}");
    if u64::from(agbno) < geo.header_blocks() || u64::from(agbno) >= geo.ag_len(ag) {
        return unsupported(format!("{where_}: pointer outside the AG"));
    }
    let pos = geo.byte_of(ag, u64::from(agbno));
    let buf = vol.read_vec(pos, geo.block_size as usize)?;
    let magic = if geo.crc {
        BNOBT_MAGIC_V5
    } else {
        BNOBT_MAGIC_V4
    };
    if &buf[0..4] != magic || be16(&buf, 4) != level {
        return unsupported(format!("{where_}: bad magic or level"));
    }
    let records = usize::from(be16(&buf, 6));
    if records > geo.max_records(level) {
        return unsupported(format!("{where_}: {records} records do not fit"));
    }
    if geo.crc {
        let ok = be64(&buf, 16) == pos / BB
            && super::array16(&buf, 32) == geo.block_uuid
            && u64::from(be32(&buf, 48)) == ag
            && crc32c_skipping(&buf, BTREE_CRC_OFF) == le32(&buf, BTREE_CRC_OFF);
        if !ok {
            return unsupported(format!("{where_}: checksum, owner or location mismatch"));
        }
    }
    Ok(BtreeBlock {
        agbno,
        records,
        left: be32(&buf, 8),
        right: be32(&buf, 12),
        buf,
    })
}

/// Lazy walk of one AG's free extents, producing the gaps between them.
struct AgWalk {
    ag: u64,
    agf: Agf,
    leaf: BtreeBlock,
    next_record: usize,
    /// AG block up to which the AG has been accounted for.
    covered: u64,
    free_seen: u64,
    done: bool,
}

impl AgWalk {
    /// Reads the AGF and descends to the leftmost bnobt leaf.
    fn start(vol: &Region, geo: &Geometry, ag: u64) -> Result<AgWalk, Bail> {
        let agf = read_agf(vol, geo, ag)?;
        let mut agbno = agf.bno_root;
        let hdr = geo.btree_header_len();
        for level in (1..agf.bno_levels as u16).rev() {
            let node = read_btree_block(vol, geo, ag, agbno, level)?;
            if node.records == 0 || node.left != NULL_AGBLOCK {
                return unsupported(format!("AG {ag}: odd leftmost bnobt node"));
            }
            // Pointers start after room for the maximum number of keys.
            agbno = be32(&node.buf, hdr + geo.max_records(level) * 8);
        }
        let leaf = read_btree_block(vol, geo, ag, agbno, 0)?;
        if leaf.left != NULL_AGBLOCK || (agf.bno_levels > 1 && leaf.records == 0) {
            return unsupported(format!("AG {ag}: odd leftmost bnobt leaf"));
        }
        Ok(AgWalk {
            ag,
            agf,
            leaf,
            next_record: 0,
            covered: 0,
            free_seen: 0,
            done: false,
        })
    }

    /// The next used range of this AG, in AG blocks; `None` once the AG is finished.
    fn next_used(&mut self, vol: &Region, geo: &Geometry) -> Result<Option<Range<u64>>, Bail> {
        while !self.done {
            if self.next_record < self.leaf.records {
                let free = self.take_record(geo)?;
                let gap = self.covered..free.start;
                self.covered = free.end;
                if !gap.is_empty() {
                    return Ok(Some(gap));
                }
            } else if self.leaf.right != NULL_AGBLOCK {
                self.step_right(vol, geo)?;
            } else {
                self.done = true;
                self.check_free_total()?;
                let tail = self.covered..self.agf.length;
                if !tail.is_empty() {
                    return Ok(Some(tail));
                }
            }
        }
        Ok(None)
    }

    fn take_record(&mut self, geo: &Geometry) -> Result<Range<u64>, Bail> {
        let off = geo.btree_header_len() + self.next_record * 8;
        self.next_record += 1;
        let start = u64::from(be32(&self.leaf.buf, off));
        let count = u64::from(be32(&self.leaf.buf, off + 4));
        let free = start..start + count;
        let log = geo.log_agbno..geo.log_agbno + geo.log_blocks;
        let overlaps_log = self.ag == geo.log_ag && free.start < log.end && log.start < free.end;
        if count == 0
            || start < self.covered.max(geo.header_blocks())
            || free.end > self.agf.length
            || overlaps_log
        {
            return unsupported(format!(
                "AG {}: free extent {start}+{count} out of order or overlapping metadata",
                self.ag
            ));
        }
        self.free_seen += count;
        Ok(free)
    }

    fn step_right(&mut self, vol: &Region, geo: &Geometry) -> Result<(), Bail> {
        let next = read_btree_block(vol, geo, self.ag, self.leaf.right, 0)?;
        if next.left != self.leaf.agbno || next.records == 0 {
            return unsupported(format!("AG {}: broken bnobt leaf chain", self.ag));
        }
        self.leaf = next;
        self.next_record = 0;
        Ok(())
    }

    fn check_free_total(&self) -> Result<(), Bail> {
        if self.free_seen != self.agf.free_blocks {
            return unsupported(format!(
                "AG {}: bnobt holds {} free blocks, AGF says {}",
                self.ag, self.free_seen, self.agf.free_blocks
            ));
        }
        Ok(())
    }
}

/// All AGs in order, converted to volume byte ranges.
struct AgRuns {
    vol: Region,
    geo: Geometry,
    next_ag: u64,
    walk: Option<AgWalk>,
}

impl Iterator for AgRuns {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let walk = match self.walk.as_mut() {
                Some(walk) => walk,
                None => {
                    if self.next_ag >= self.geo.ag_count {
                        return None;
                    }
                    let ag = self.next_ag;
                    self.next_ag += 1;
                    match AgWalk::start(&self.vol, &self.geo, ag) {
                        Ok(walk) => self.walk.insert(walk),
                        Err(b) => return Some(self.fail(b)),
                    }
                }
            };
            match walk.next_used(&self.vol, &self.geo) {
                Ok(Some(blocks)) => {
                    let ag = walk.ag;
                    let start = self.geo.byte_of(ag, blocks.start);
                    let end = self.geo.byte_of(ag, blocks.end);
                    return Some(Ok(start..end));
                }
                Ok(None) => self.walk = None,
                Err(b) => return Some(self.fail(b)),
            }
        }
    }
}

impl AgRuns {
    fn fail(&mut self, b: Bail) -> io::Result<Range<u64>> {
        self.walk = None;
        self.next_ag = self.geo.ag_count;
        Err(b.into_io("xfs"))
    }
}

/// Where the log's head is and which block holds the last record header.
struct LogScan {
    head: u64,
    last_header: u64,
}

/// True only when the log ends, right at its head, in a record that holds nothing but an
/// unmount marker: the state in which the kernel skips recovery.
/// Whether log recovery would leave the free-space trees as they are on disk: the log ends
/// in an unmount record, or holds only superblock updates (see the module comment).
fn log_is_clean(vol: &Region, geo: &Geometry) -> Result<bool, Bail> {
    let start = geo.byte_of(geo.log_ag, geo.log_agbno);
    let bbs = geo.log_blocks * geo.block_size / BB;
    let Some(scan) = scan_log(vol, start, bbs)? else {
        return Ok(false);
    };
    // The last record's header: both checks start from it.
    let last = vol.read_vec(start + scan.last_header * BB, BB as usize)?;
    if ends_unmounted(vol, geo, start, bbs, &scan, &last)? {
        return Ok(true);
    }
    only_superblock_updates(vol, start, bbs, &scan, &last)
}

fn ends_unmounted(
    vol: &Region,
    geo: &Geometry,
    start: u64,
    bbs: u64,
    scan: &LogScan,
    header: &[u8],
) -> Result<bool, Bail> {
    let version = be32(header, 8);
    if version != 1 && version != 2 {
        return Ok(false);
    }
    let len = u64::from(be32(header, 12));
    let h_size = u64::from(be32(header, 320));
    let header_bbs = if geo.logv2 && version == 2 && h_size > LOG_HEADER_CYCLE_SIZE {
        h_size.div_ceil(LOG_HEADER_CYCLE_SIZE)
    } else {
        1
    };
    if len > bbs * BB || header_bbs > 8 || be32(header, 40) != 1 {
        return Ok(false);
    }
    let after = (scan.last_header + header_bbs + len.div_ceil(BB)) % bbs;
    if after != scan.head {
        return Ok(false);
    }
    let data_bb = (scan.last_header + header_bbs) % bbs;
    let op = vol.read_vec(start + data_bb * BB, BB as usize)?;
    Ok(op[9] & LOG_UNMOUNT_TRANS != 0)
}

// Log operation headers and what they carry (xfs_log_format.h).
const LOG_OP_HEADER: usize = 12;
const LOG_CLIENT_TRANSACTION: u8 = 0x69;
const LOG_START_TRANS: u8 = 0x01;
const LOG_COMMIT_TRANS: u8 = 0x02;
const LOG_CONTINUE_TRANS: u8 = 0x04;
const LOG_WAS_CONT_TRANS: u8 = 0x08;
const TRANS_HEADER_MAGIC: u32 = 0x5452_414E; // "TRAN"
const LOG_ITEM_BUF: u16 = 0x123C;
/// The superblock's buffer: disk address 0, one 512-byte block.
const SB_DADDR: i64 = 0;
const SB_BBS: u16 = 1;
/// A frozen log holds two dummy records; a few more are tolerated, then we give up.
const QUIESCED_MAX_RECORDS: u32 = 8;
/// Record header fields.
const REC_LEN: usize = 12;
const REC_LSN: usize = 16;
const REC_TAIL_LSN: usize = 24;
const REC_NUM_LOGOPS: usize = 40;
const REC_CYCLE_DATA: usize = 44;
const REC_CYCLE_WORDS: u64 = 64;
const REC_SIZE: usize = 320;

/// Where a transaction being parsed is: log items are written in the writer's byte order
/// (`little` is decided by the transaction header's magic).
#[derive(Clone, Copy)]
enum TransState {
    Idle,
    Started,
    /// `regions_left` of the current item's data regions still to come. (The header's
    /// item count is not used: in checkpoints it counts regions, not items.)
    Items {
        little: bool,
        regions_left: u16,
    },
}

/// Whether every log record from the tail (named by the last record) to the head holds
/// only whole transactions that log the superblock buffer and nothing else. Replaying such
/// a log rewrites sector 0 only; every other block, the free-space trees included, is
/// already in place. Anything unexpected (a split operation, another item type, a record
/// that does not parse, too many records) answers no.
fn only_superblock_updates(
    vol: &Region,
    start: u64,
    bbs: u64,
    scan: &LogScan,
    last: &[u8],
) -> Result<bool, Bail> {
    let tail_lsn = be64(last, REC_TAIL_LSN);
    let (tail_cycle, tail_block) = ((tail_lsn >> 32) as u32, tail_lsn & 0xFFFF_FFFF);
    if tail_block >= bbs {
        return Ok(false);
    }
    let mut at = tail_block;
    let mut cycle = tail_cycle;
    let mut state = TransState::Idle;
    let mut records = 0;
    while at != scan.head {
        records += 1;
        if records > QUIESCED_MAX_RECORDS {
            return Ok(false);
        }
        let header = vol.read_vec(start + at * BB, BB as usize)?;
        if be32(&header, 0) != LOG_MAGIC
            || be32(&header, 4) != cycle
            || be64(&header, REC_LSN) != (u64::from(cycle) << 32 | at)
        {
            return Ok(false);
        }
        let len = u64::from(be32(&header, REC_LEN));
        let data_bbs = len.div_ceil(BB);
        let h_size = u64::from(be32(&header, REC_SIZE));
        // Data longer than one header's cycle words (or extended headers) is no dummy.
        if data_bbs > REC_CYCLE_WORDS || h_size > LOG_HEADER_CYCLE_SIZE {
            return Ok(false);
        }
        let mut data = Vec::with_capacity((data_bbs * BB) as usize);
        for i in 0..data_bbs {
            let bb = (at + 1 + i) % bbs;
            let mut block = vol.read_vec(start + bb * BB, BB as usize)?;
            // The first word of each data block was replaced by the cycle number; the
            // header keeps the original.
            let word = REC_CYCLE_DATA + 4 * i as usize;
            block[..4].copy_from_slice(&header[word..word + 4]);
            data.extend_from_slice(&block);
        }
        data.truncate(len as usize);
        let Some(next) = parse_ops(&data, be32(&header, REC_NUM_LOGOPS), state) else {
            return Ok(false);
        };
        state = next;
        let after = at + 1 + data_bbs;
        if after >= bbs {
            cycle += 1;
        }
        at = after % bbs;
    }
    Ok(records > 0 && matches!(state, TransState::Idle))
}

/// Parses one record's operations, carrying the transaction state across records; `None`
/// if anything but superblock-buffer transactions is found.
fn parse_ops(data: &[u8], ops: u32, mut state: TransState) -> Option<TransState> {
    let mut off = 0;
    let mut seen = 0;
    // The record's length is padded: the header's operation count says where it ends.
    while seen < ops {
        let op = data.get(off..off + LOG_OP_HEADER)?;
        let len = be32(op, 4) as usize;
        let (client, flags) = (op[8], op[9]);
        let payload = data.get(off + LOG_OP_HEADER..off + LOG_OP_HEADER + len)?;
        off += LOG_OP_HEADER + len;
        seen += 1;
        if client != LOG_CLIENT_TRANSACTION
            || flags & (LOG_CONTINUE_TRANS | LOG_WAS_CONT_TRANS) != 0
        {
            return None;
        }
        state = if flags & LOG_START_TRANS != 0 {
            match state {
                TransState::Idle if len == 0 => TransState::Started,
                _ => return None,
            }
        } else if flags & LOG_COMMIT_TRANS != 0 {
            match state {
                TransState::Items {
                    regions_left: 0, ..
                } if len == 0 => TransState::Idle,
                _ => return None,
            }
        } else {
            match state {
                TransState::Idle => return None,
                TransState::Started => {
                    let magic = payload.get(..4)?;
                    let little = if be32(magic, 0) == TRANS_HEADER_MAGIC {
                        false
                    } else if le32(magic, 0) == TRANS_HEADER_MAGIC {
                        true
                    } else {
                        return None;
                    };
                    TransState::Items {
                        little,
                        regions_left: 0,
                    }
                }
                TransState::Items {
                    little,
                    regions_left: 0,
                } => {
                    // An item's format structure: a buffer item for the superblock only.
                    let f = payload.get(..16)?;
                    let u16_at = |i: usize| {
                        let b = [f[i], f[i + 1]];
                        if little {
                            u16::from_le_bytes(b)
                        } else {
                            u16::from_be_bytes(b)
                        }
                    };
                    let blkno_bytes: [u8; 8] = f[8..16].try_into().ok()?;
                    let blkno = if little {
                        i64::from_le_bytes(blkno_bytes)
                    } else {
                        i64::from_be_bytes(blkno_bytes)
                    };
                    let (kind, regions, bbs) = (u16_at(0), u16_at(2), u16_at(6));
                    if kind != LOG_ITEM_BUF || blkno != SB_DADDR || bbs != SB_BBS || regions == 0 {
                        return None;
                    }
                    TransState::Items {
                        little,
                        regions_left: regions - 1,
                    }
                }
                TransState::Items {
                    little,
                    regions_left,
                } => TransState::Items {
                    little,
                    regions_left: regions_left - 1,
                },
            }
        };
    }
    Some(state)
}

/// Reads the cycle number stamped on every 512-byte log block. A log that is not exactly
/// "cycle c up to the head, c - 1 after it" had writes in flight: `None`.
fn scan_log(vol: &Region, start: u64, bbs: u64) -> io::Result<Option<LogScan>> {
    let mut first_cycle = None;
    let mut head = None;
    let mut header_before_head = None;
    let mut header_after_head = None;
    let mut bb = 0;
    while bb < bbs {
        let count = (bbs - bb).min(LOG_SCAN_CHUNK_BBS);
        let buf = vol.read_vec(start + bb * BB, (count * BB) as usize)?;
        for (i, block) in buf.chunks_exact(BB as usize).enumerate() {
            let index = bb + i as u64;
            let word = be32(block, 0);
            let is_header = word == LOG_MAGIC;
            let cycle = if is_header { be32(block, 4) } else { word };
            let c0 = *first_cycle.get_or_insert(cycle);
            let previous = c0.checked_sub(1);
            match head {
                None if cycle == c0 => {}
                None if Some(cycle) == previous => head = Some(index),
                Some(_) if Some(cycle) == previous => {}
                _ => return Ok(None),
            }
            if !is_header {
                continue;
            }
            if head.is_none() {
                header_before_head = Some(index);
            } else {
                header_after_head = Some(index);
            }
        }
        bb += count;
    }
    // Searching backwards from the head, wrapping past the log's end if needed.
    let last_header = header_before_head.or(header_after_head);
    Ok(last_header.map(|last_header| LogScan {
        head: head.unwrap_or(0),
        last_header,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::testutil::*;
    use crate::fs::{detect, FsKind};
    use std::path::Path;

    fn reason(vol: &Region, info: &FsInfo) -> Option<String> {
        used_ranges_or_reason(vol, info).unwrap().err().map(|u| u.0)
    }

    fn make_xfs(tag: &str, args: &[&str], mib: u64) -> Option<TempPath> {
        let img = image(tag, mib);
        let mut full = vec!["-q", "-f", "-L", "bk-xfs"];
        full.extend_from_slice(args);
        full.push(img.as_str());
        let out = run_unchecked("mkfs.xfs", &full);
        if !out.status.success() {
            eprintln!(
                "skipping {tag}: mkfs.xfs refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(img)
    }

    /// Free blocks per AG as xfs_db reads them from the AGFs, and the AGFL blocks, which
    /// xfs_db's freesp also counts as free.
    fn xfs_db_free_blocks(image: &Path, ag_count: u64) -> (u64, u64) {
        let mut args = vec!["-r".to_string()];
        for ag in 0..ag_count {
            args.extend([
                "-c".into(),
                format!("agf {ag}"),
                "-c".into(),
                "print freeblks flcount".into(),
            ]);
        }
        args.push(image.to_str().unwrap().into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = run("xfs_db", &args);
        let sum = |key: &str| -> u64 {
            text.lines()
                .filter_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().parse::<u64>().unwrap())
                .sum()
        };
        (sum("freeblks = "), sum("flcount = "))
    }

    fn xfs_db_total_free(image: &Path) -> u64 {
        run(
            "xfs_db",
            &["-r", "-c", "freesp -s", image.to_str().unwrap()],
        )
        .lines()
        .find_map(|l| l.strip_prefix("total free blocks "))
        .map(|v| v.trim().parse().unwrap())
        .expect("freesp summary")
    }

    /// Build, fill, map, compare with xfs_db, copy only the map, repair -n and compare.
    fn round_trip(tag: &str, args: &[&str], mib: u64, small_files: usize) -> u32 {
        round_trip_keep(tag, args, mib, small_files).map_or(0, |(levels, _)| levels)
    }

    fn round_trip_keep(
        tag: &str,
        args: &[&str],
        mib: u64,
        small_files: usize,
    ) -> Option<(u32, TempPath)> {
        if !tools_available(&["mkfs.xfs", "xfs_db", "xfs_repair", "blkid", "mount"]) {
            return None;
        }
        let img = make_xfs(tag, args, mib)?;
        // Kernels without v4 support cannot mount some images: map the fresh filesystem.
        let mountable = mount_check(img.path());
        let files = if mountable {
            let m = mount(img.path(), "rw");
            populate(m.dir(), small_files)
        } else {
            eprintln!("{tag}: this kernel cannot mount it; mapping the empty filesystem");
            Vec::new()
        };
        Some((check_map(tag, &img, &files, mountable), img))
    }

    /// Maps the image, compares with xfs_db, copies only the map, repairs -n and compares
    /// the files; returns the deepest bnobt seen.
    fn check_map(tag: &str, img: &TempPath, files: &[FileSpec], mountable: bool) -> u32 {
        let vol = region(img.path());
        let info = detect(&vol).unwrap().expect("detected");
        assert_eq!(info.kind, FsKind::Xfs);
        assert_matches_blkid(img.path(), &info);

        let ranges = match used_ranges_or_reason(&vol, &info).unwrap() {
            Ok(iter) => collect(iter),
            Err(why) => panic!("{tag}: unsupported: {why:?}"),
        };
        assert_shape(&ranges, vol.len());
        let geo = Geometry::read(&vol).unwrap_or_else(|_| panic!("geometry"));
        let (free, agfl) = xfs_db_free_blocks(img.path(), geo.ag_count);
        assert_eq!(free + agfl, xfs_db_total_free(img.path()));
        let used = (geo.dblocks - free) * geo.block_size;
        let levels = (0..geo.ag_count)
            .map(|ag| read_agf(&vol, &geo, ag).map_or(0, |agf| agf.bno_levels))
            .max()
            .unwrap_or(0);
        eprintln!(
            "{tag}: {} ranges, {} of {} MiB used, {} AGs, log in AG {}, bnobt levels {levels}",
            ranges.len(),
            total(&ranges) >> 20,
            vol.len() >> 20,
            geo.ag_count,
            geo.log_ag
        );
        assert_eq!(
            total(&ranges),
            used,
            "{tag}: map differs from xfs_db's free count"
        );

        let copy = copy_ranges(img.path(), &ranges);
        let repair = run_unchecked("xfs_repair", &["-n", "-f", copy.as_str()]);
        assert!(
            repair.status.success(),
            "{tag}: xfs_repair -n on the copy: {}{}",
            String::from_utf8_lossy(&repair.stdout),
            String::from_utf8_lossy(&repair.stderr)
        );
        if mountable {
            let m = mount(copy.path(), "ro,norecovery");
            verify_files(m.dir(), files);
        }
        levels
    }

    fn mount_check(image: &Path) -> bool {
        let dir = TempPath(temp_name("probe-mnt"));
        std::fs::create_dir(dir.path()).unwrap();
        let ok = run_unchecked(
            "mount",
            &["-o", "loop,ro", image.to_str().unwrap(), dir.as_str()],
        )
        .status
        .success();
        if ok {
            run("umount", &[dir.as_str()]);
        }
        ok
    }

    #[test]
    fn xfs_default_v5() {
        round_trip("xfs-v5", &[], 512, 400);
    }

    #[test]
    fn xfs_v4_without_crc() {
        let args = [
            "-m",
            "crc=0,finobt=0,reflink=0,rmapbt=0,bigtime=0,inobtcount=0",
            "-i",
            "sparse=0",
        ];
        round_trip("xfs-v4", &args, 512, 400);
    }

    #[test]
    fn xfs_small_blocks_many_ags_fragmented() {
        // 1 KiB blocks hold ~120 free extents per leaf: thousands of holes force a
        // multi-level bnobt with several leaves.
        let args = ["-b", "size=1024", "-d", "agcount=6"];
        let Some((levels, img)) = round_trip_keep("xfs-1k", &args, 512, 6000) else {
            return;
        };
        assert!(levels >= 2, "wanted a multi-level bnobt, got {levels}");
        damage_second_leaf_gives_error(&img);
    }

    /// Damage past the first leaf is only seen mid-walk: it must end in an error.
    fn damage_second_leaf_gives_error(img: &TempPath) {
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        let geo = Geometry::read(&vol).unwrap_or_else(|_| panic!("geometry"));
        let ag = (0..geo.ag_count)
            .find(|&ag| read_agf(&vol, &geo, ag).is_ok_and(|agf| agf.bno_levels == 2))
            .expect("an AG with a two-level bnobt");
        let agf = read_agf(&vol, &geo, ag).unwrap_or_else(|_| panic!("agf"));
        let root =
            read_btree_block(&vol, &geo, ag, agf.bno_root, 1).unwrap_or_else(|_| panic!("root"));
        let ptrs = geo.btree_header_len() + geo.max_records(1) * 8;
        let second = be32(&root.buf, ptrs + 4);
        patch(img.path(), geo.byte_of(ag, u64::from(second)) + 60, &[0xFF]);
        let iter = used_ranges(&region(img.path()), &info)
            .unwrap()
            .expect("first leaves fine");
        let last = iter.last().expect("some ranges");
        let err = last.expect_err("the damaged leaf must end the map with an error");
        assert!(err.to_string().contains(&format!("AG {ag}")), "{err}");
    }

    #[test]
    fn xfs_4k_sectors_and_rmap() {
        round_trip("xfs-4ks", &["-s", "size=4096", "-m", "rmapbt=1"], 400, 400);
    }

    /// mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under fstests.
    fn make_small_xfs(tag: &str, args: &[&str], mib: u64) -> Option<TempPath> {
        let img = image(tag, mib);
        let mut cmd = std::process::Command::new("mkfs.xfs");
        cmd.args(["-q", "-f"]).args(args).arg(img.path());
        cmd.env("TEST_DIR", "/tmp")
            .env("TEST_DEV", "x")
            .env("QA_CHECK_FS", "1");
        let ok = cmd.output().map(|o| o.status.success()).unwrap_or(false);
        if !ok {
            skip(&format!("{tag}: mkfs.xfs refused a small filesystem"));
        }
        ok.then_some(img)
    }

    fn cycle_of_first_log_block(vol: &Region, geo: &Geometry) -> u32 {
        let buf = vol
            .read_vec(geo.byte_of(geo.log_ag, geo.log_agbno), 512)
            .unwrap();
        if be32(&buf, 0) == LOG_MAGIC {
            be32(&buf, 4)
        } else {
            be32(&buf, 0)
        }
    }

    /// A tiny log filled several times over: the head sits mid-log after a wrap.
    #[test]
    fn xfs_wrapped_log_is_clean_after_umount() {
        if !tools_available(&["mkfs.xfs", "xfs_db", "xfs_repair", "mount"]) {
            return;
        }
        let Some(img) = make_small_xfs("xfs-wrap", &["-l", "size=1368b"], 160) else {
            return;
        };
        let files = {
            let m = mount(img.path(), "rw");
            for round in 0..4 {
                let dir = m.dir().join(format!("churn{round}"));
                std::fs::create_dir(&dir).unwrap();
                for i in 0..4000 {
                    std::fs::write(dir.join(format!("f{i}")), b"").unwrap();
                }
                std::fs::remove_dir_all(&dir).unwrap();
            }
            populate(m.dir(), 200)
        };
        let vol = region(img.path());
        let geo = Geometry::read(&vol).unwrap_or_else(|_| panic!("geometry"));
        let cycle = cycle_of_first_log_block(&vol, &geo);
        assert!(cycle >= 2, "log did not wrap (cycle {cycle})");
        check_map("xfs-wrap", &img, &files, true);
    }

    #[test]
    fn xfs_mounted_or_shut_down_is_refused() {
        if !tools_available(&["mkfs.xfs", "xfs_io", "mount"]) {
            return;
        }
        let Some(img) = make_xfs("xfs-dirty", &[], 512) else {
            return;
        };
        let info = detect(&region(img.path())).unwrap().unwrap();
        let m = mount(img.path(), "rw");
        std::fs::write(m.dir().join("a"), pattern(7, 3 << 20)).unwrap();
        run("sync", &[]);
        let why = reason(&region(img.path()), &info).expect("mounted XFS must not be mapped");
        assert!(why.contains("log"), "{why}");

        // Shut down after the log is flushed: committed changes exist only in the log.
        std::fs::write(m.dir().join("b"), pattern(8, 3 << 20)).unwrap();
        run(
            "xfs_io",
            &["-x", "-c", "shutdown -f", m.dir().to_str().unwrap()],
        );
        drop(m);
        let why = reason(&region(img.path()), &info).expect("dirty log must not be mapped");
        assert!(why.contains("log"), "{why}");

        // Recovery on the next mount leaves it clean again.
        drop(mount(img.path(), "rw"));
        assert_eq!(reason(&region(img.path()), &info), None);
    }

    /// A frozen XFS, as a snapshot taken under freeze holds it: the log is not ended by an
    /// unmount record but only covered by superblock updates. It is mapped, the map matches
    /// the free-space trees, and the copy of the mapped blocks mounts (replaying those
    /// updates), checks clean and holds every file.
    #[test]
    fn xfs_frozen_is_mapped() {
        if !tools_available(&["mkfs.xfs", "xfs_db", "xfs_repair", "xfs_freeze", "mount"]) {
            return;
        }
        let Some(img) = make_xfs("xfs-frozen", &[], 512) else {
            return;
        };
        if !mount_check(img.path()) {
            return;
        }
        let m = mount(img.path(), "rw");
        let files = populate(m.dir(), 300);
        let dir = m.dir().to_str().unwrap().to_string();
        run("xfs_freeze", &["-f", &dir]);
        let frozen = TempPath(temp_name("xfs-frozen-copy"));
        let copied = std::fs::copy(img.path(), frozen.path());
        run("xfs_freeze", &["-u", &dir]);
        drop(m);
        copied.unwrap();

        let vol = region(frozen.path());
        let geo = Geometry::read(&vol).unwrap_or_else(|_| panic!("geometry"));
        let start = geo.byte_of(geo.log_ag, geo.log_agbno);
        let bbs = geo.log_blocks * geo.block_size / BB;
        let scan = scan_log(&vol, start, bbs).unwrap().expect("log scan");
        let last = vol
            .read_vec(start + scan.last_header * BB, BB as usize)
            .unwrap();
        assert!(
            !ends_unmounted(&vol, &geo, start, bbs, &scan, &last).unwrap_or(false),
            "a frozen log has no unmount record (the test would prove nothing)"
        );
        let info = detect(&vol).unwrap().expect("detected");
        let ranges = match used_ranges_or_reason(&vol, &info).unwrap() {
            Ok(iter) => collect(iter),
            Err(why) => panic!("frozen XFS not mapped: {why:?}"),
        };
        let (free, _) = xfs_db_free_blocks(frozen.path(), geo.ag_count);
        assert_eq!(total(&ranges), (geo.dblocks - free) * geo.block_size);

        let copy = copy_ranges(frozen.path(), &ranges);
        drop(mount(copy.path(), "rw")); // replays the superblock updates
        let repair = run_unchecked("xfs_repair", &["-n", "-f", copy.as_str()]);
        assert!(
            repair.status.success(),
            "xfs_repair -n on the copy: {}{}",
            String::from_utf8_lossy(&repair.stdout),
            String::from_utf8_lossy(&repair.stderr)
        );
        let m = mount(copy.path(), "ro");
        verify_files(m.dir(), &files);
    }

    /// The record parser refuses what is not a superblock-only transaction.
    #[test]
    fn log_ops_other_than_the_superblock_are_refused() {
        fn op(flags: u8, payload: &[u8]) -> Vec<u8> {
            let mut v = vec![0, 0, 0, 1];
            v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            v.extend_from_slice(&[LOG_CLIENT_TRANSACTION, flags, 0, 0]);
            v.extend_from_slice(payload);
            v
        }
        let header = {
            let mut h = TRANS_HEADER_MAGIC.to_le_bytes().to_vec();
            h.extend_from_slice(&[0; 8]);
            h.extend_from_slice(&1u32.to_le_bytes());
            h
        };
        let buf = |blkno: i64, kind: u16| {
            let mut f = kind.to_le_bytes().to_vec();
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&0u16.to_le_bytes());
            f.extend_from_slice(&1u16.to_le_bytes());
            f.extend_from_slice(&blkno.to_le_bytes());
            f.extend_from_slice(&[0; 8]);
            f
        };
        let trans = |format: Vec<u8>| {
            [
                op(LOG_START_TRANS, &[]),
                op(0, &header),
                op(0, &format),
                op(0, b"XFSB and the rest of the superblock"),
                op(LOG_COMMIT_TRANS, &[]),
            ]
            .concat()
        };
        let sb = trans(buf(0, LOG_ITEM_BUF));
        assert!(matches!(
            parse_ops(&sb, 5, TransState::Idle),
            Some(TransState::Idle)
        ));
        // Another buffer, another item type, a wrong op count, a split op.
        assert!(parse_ops(&trans(buf(8, LOG_ITEM_BUF)), 5, TransState::Idle).is_none());
        assert!(parse_ops(&trans(buf(0, 0x123B)), 5, TransState::Idle).is_none());
        assert!(parse_ops(&sb, 6, TransState::Idle).is_none());
        assert!(!matches!(
            parse_ops(&sb, 4, TransState::Idle),
            Some(TransState::Idle)
        ));
        let mut split = sb.clone();
        split[9 + 12] |= LOG_CONTINUE_TRANS; // the header op
        assert!(parse_ops(&split, 5, TransState::Idle).is_none());
        // Truncated: an op longer than the record.
        assert!(parse_ops(&sb[..sb.len() - 3], 5, TransState::Idle).is_none());
    }

    fn patch(image: &Path, pos: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
        f.write_all_at(bytes, pos).unwrap();
    }

    #[test]
    fn damaged_agf_or_btree_root_is_refused() {
        if !tools_available(&["mkfs.xfs"]) {
            return;
        }
        for v4 in [false, true] {
            let args: &[&str] = if v4 {
                &[
                    "-m",
                    "crc=0,finobt=0,reflink=0,rmapbt=0,bigtime=0,inobtcount=0",
                    "-i",
                    "sparse=0",
                ]
            } else {
                &[]
            };
            let Some(img) = make_xfs("xfs-damaged", args, 512) else {
                continue;
            };
            let vol = region(img.path());
            let info = detect(&vol).unwrap().unwrap();
            assert_eq!(reason(&vol, &info), None);
            let geo = Geometry::read(&vol).unwrap_or_else(|_| panic!("geometry"));
            let agf_pos = geo.byte_of(1, 0) + geo.sect_size;
            let agf = read_agf(&vol, &geo, 1).unwrap_or_else(|_| panic!("agf"));
            let root_pos = geo.byte_of(1, u64::from(agf.bno_root));

            // A free extent that swallows the whole AG, in the (only) leaf.
            let hdr = geo.btree_header_len() as u64;
            let mut record = vec![0u8; 8];
            record[0..4].copy_from_slice(&1u32.to_be_bytes());
            record[4..8].copy_from_slice(&(agf.length as u32 - 1).to_be_bytes());
            let saved = vol.read_vec(root_pos + hdr, 8).unwrap();
            patch(img.path(), root_pos + hdr, &record);
            let why = reason(&region(img.path()), &info).expect("bad leaf must be refused");
            assert!(why.contains("AG 1"), "v4={v4}: {why}");
            patch(img.path(), root_pos + hdr, &saved);

            // AGF length changed.
            let saved = vol.read_vec(agf_pos + 12, 4).unwrap();
            patch(img.path(), agf_pos + 12, &[0, 0, 0, 1]);
            let why = reason(&region(img.path()), &info).expect("bad AGF must be refused");
            assert!(why.contains("AG 1"), "v4={v4}: {why}");
            patch(img.path(), agf_pos + 12, &saved);
            assert_eq!(reason(&region(img.path()), &info), None);
        }
    }

    #[test]
    fn external_log_and_short_volume_are_refused() {
        if !tools_available(&["mkfs.xfs"]) {
            return;
        }
        let log = image("xfs-extlog-log", 64);
        let logdev = format!("logdev={},size=2048b", log.as_str());
        let Some(img) = make_small_xfs("xfs-extlog", &["-l", &logdev], 512) else {
            return;
        };
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        assert!(reason(&vol, &info).unwrap().contains("external log"));

        let Some(img) = make_xfs("xfs-short", &[], 512) else {
            return;
        };
        let vol = region(img.path());
        let info = detect(&vol).unwrap().unwrap();
        let short = Region::new(vol.file().clone(), 0, vol.len() - 4096);
        assert!(reason(&short, &info)
            .unwrap()
            .contains("larger than the volume"));
        let tiny = Region::new(vol.file().clone(), 0, 100);
        assert!(reason(&tiny, &info).unwrap().contains("too small"));
    }
}
