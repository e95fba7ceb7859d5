//! From a tracker's table to a change map (spec/kmod-uapi.md §7, spec/format.md §9).

use bkimg_format::changemap::ChangeMap;

use crate::control::TrackerState;
use crate::error::{KmodError, Result};

/// The change map "after snapshot `from_sequence` up to snapshot `to_sequence`": every
/// maximal run of blocks whose byte is greater than `from_sequence`. Blocks written after
/// `to_sequence` are included too (a superset is allowed). `to_sequence` must be a
/// snapshot taken already (below the active sequence). The caller checks that the
/// tracker's generation is the one the parent was captured at.
pub fn change_map(state: &TrackerState, from_sequence: u64, to_sequence: u64) -> Result<ChangeMap> {
    let table = state
        .table
        .as_deref()
        .ok_or_else(|| KmodError::Invalid("the tracker state was read without its table".into()))?;
    if from_sequence > to_sequence {
        return Err(KmodError::Invalid(format!(
            "a change map from snapshot {from_sequence} to {to_sequence} runs backwards"
        )));
    }
    // The active sequence has not ended: a map up to it would be followed by one that
    // starts there and misses the writes still to come in it.
    if to_sequence >= state.sequence {
        return Err(KmodError::Invalid(format!(
            "the tracker of {} is at sequence {}: a change map can end at snapshot {} at the \
             latest, not {to_sequence}",
            state.dev.describe(),
            state.sequence,
            state.sequence.saturating_sub(1)
        )));
    }
    let blocks = state
        .device_size()
        .div_ceil(u64::from(state.block_size.max(1)));
    if table.len() as u64 != blocks || state.blocks != blocks {
        return Err(KmodError::Invalid(format!(
            "the tracker of {} has {} table bytes for {blocks} blocks",
            state.dev.describe(),
            table.len()
        )));
    }
    let map = ChangeMap {
        block_size: state.block_size,
        device_size: state.device_size(),
        generation: state.generation,
        from_sequence,
        to_sequence,
        ranges: dirty_runs(table, from_sequence),
    };
    map.validate()
        .map_err(|e| KmodError::Invalid(format!("building the change map: {e}")))?;
    Ok(map)
}

/// Maximal runs `(first, count)` of bytes greater than `after`.
pub fn dirty_runs(table: &[u8], after: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &b) in table.iter().enumerate() {
        match (u64::from(b) > after, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s as u64, (i - s) as u64));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push((s as u64, (table.len() - s) as u64));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DevNum;

    fn state(block_size: u32, device_sectors: u64, table: Vec<u8>, sequence: u64) -> TrackerState {
        TrackerState {
            dev: DevNum::new(253, 16),
            block_size,
            device_sectors,
            blocks: table.len() as u64,
            generation: [9; 16],
            sequence,
            snapshot_id: Some(3),
            writes: 0,
            table: Some(table),
        }
    }

    #[test]
    fn runs() {
        assert_eq!(dirty_runs(&[], 0), vec![]);
        assert_eq!(dirty_runs(&[0, 0, 0], 0), vec![]);
        assert_eq!(dirty_runs(&[1, 1, 1], 0), vec![(0, 3)]);
        assert_eq!(dirty_runs(&[1, 2, 3], 1), vec![(1, 2)]);
        assert_eq!(
            dirty_runs(&[3, 0, 3, 3, 0, 0, 3], 2),
            vec![(0, 1), (2, 2), (6, 1)]
        );
        assert_eq!(dirty_runs(&[5, 5, 1, 5], 4), vec![(0, 2), (3, 1)]);
        assert_eq!(dirty_runs(&[255, 254], 254), vec![(0, 1)]);
        // from >= every value: nothing.
        assert_eq!(dirty_runs(&[1, 2, 3, 2, 1], 3), vec![]);
        assert_eq!(dirty_runs(&[1, 2, 3, 2, 1], 200), vec![]);
    }

    #[test]
    fn empty_table_and_nothing_written() {
        let s = state(4096, 2048, vec![0; 256], 2);
        let m = change_map(&s, 0, 1).unwrap();
        assert!(m.ranges.is_empty());
        assert_eq!(m.device_size, 1 << 20);
        assert_eq!(m.block_size, 4096);
        assert_eq!(m.generation, [9; 16]);
        assert_eq!((m.from_sequence, m.to_sequence), (0, 1));
        // It survives encoding (a valid map).
        assert_eq!(ChangeMap::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn everything_written() {
        let s = state(65536, 2048, vec![2; 16], 3);
        let m = change_map(&s, 1, 2).unwrap();
        assert_eq!(m.ranges, vec![(0, 16)]);
        assert_eq!(m.byte_ranges().collect::<Vec<_>>(), vec![0..1 << 20]);
    }

    #[test]
    fn last_block_partial() {
        // 1 MiB + 4 KiB in 64 KiB blocks: 17 blocks, the last covers 4 KiB.
        let sectors = ((1 << 20) + 4096) / 512;
        let mut table = vec![0u8; 17];
        table[16] = 2;
        table[15] = 2;
        table[3] = 1;
        let s = state(65536, sectors, table, 3);
        let m = change_map(&s, 1, 2).unwrap();
        assert_eq!(m.ranges, vec![(15, 2)]);
        assert_eq!(
            m.byte_ranges().collect::<Vec<_>>(),
            vec![15 * 65536..(1 << 20) + 4096]
        );
        assert_eq!(ChangeMap::decode(&m.encode()).unwrap(), m);
        // From 0: block 3 too.
        let m = change_map(&s, 0, 2).unwrap();
        assert_eq!(m.ranges, vec![(3, 1), (15, 2)]);
    }

    #[test]
    fn from_at_or_past_every_value_gives_no_ranges() {
        let s = state(4096, 64, vec![1, 2, 3, 3, 2, 1, 0, 3], 5);
        assert!(change_map(&s, 3, 3).unwrap().ranges.is_empty());
        assert!(change_map(&s, 4, 4).unwrap().ranges.is_empty());
        assert_eq!(change_map(&s, 2, 4).unwrap().ranges, vec![(2, 2), (7, 1)]);
    }

    #[test]
    fn refuses_what_cannot_be_a_map() {
        let s = state(4096, 64, vec![1; 8], 4);
        assert!(change_map(&s, 3, 2).is_err(), "backwards");
        assert!(
            change_map(&s, 0, 4).is_err(),
            "the active sequence has not ended"
        );
        assert!(change_map(&s, 0, 5).is_err(), "beyond the active sequence");
        assert!(change_map(&s, 0, 3).is_ok());
        let mut no_table = s.clone();
        no_table.table = None;
        assert!(change_map(&no_table, 0, 1).is_err());
        let mut short = s.clone();
        short.table = Some(vec![1; 7]);
        assert!(change_map(&short, 0, 1).is_err());
    }

    /// A random table against a block-by-block reference: the ranges cover exactly the
    /// blocks whose byte is past `from`, maximal (no two touch).
    #[test]
    fn matches_a_reference() {
        let mut x: u32 = 0x1234_5678;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..200 {
            let n = (next() % 300) as usize;
            let table: Vec<u8> = (0..n).map(|_| (next() % 6) as u8).collect();
            let from = u64::from(next() % 7);
            let runs = dirty_runs(&table, from);
            let mut covered = vec![false; n];
            for w in runs.windows(2) {
                assert!(
                    w[0].0 + w[0].1 < w[1].0,
                    "round {round}: runs touch: {runs:?}"
                );
            }
            for &(s, c) in &runs {
                assert!(c >= 1);
                for b in s..s + c {
                    covered[b as usize] = true;
                }
            }
            for (i, &b) in table.iter().enumerate() {
                assert_eq!(covered[i], u64::from(b) > from, "round {round} block {i}");
            }
        }
    }
}
