//! Walking sorted byte ranges alongside chunks that advance through a volume.

use std::io;
use std::ops::Range;

/// Yields, for each successive chunk, the parts of a sorted range stream that overlap it.
pub struct RangeCursor<I> {
    ranges: I,
    current: Option<Range<u64>>,
}

impl<I: Iterator<Item = io::Result<Range<u64>>>> RangeCursor<I> {
    pub fn new(ranges: I) -> Self {
        RangeCursor {
            ranges,
            current: None,
        }
    }

    /// The overlaps of `[start, end)` with the ranges, clipped to it. Calls must come with
    /// non-decreasing `start`.
    pub fn overlaps(&mut self, start: u64, end: u64, out: &mut Vec<Range<u64>>) -> io::Result<()> {
        out.clear();
        loop {
            let r = match self.current.take() {
                Some(r) => r,
                None => match self.ranges.next().transpose()? {
                    Some(r) => r,
                    None => return Ok(()),
                },
            };
            if r.end <= start {
                continue;
            }
            if r.start >= end {
                self.current = Some(r);
                return Ok(());
            }
            out.push(r.start.max(start)..r.end.min(end));
            if r.end > end {
                self.current = Some(r);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_follow_chunks() {
        let ranges = vec![0..10u64, 15..40, 90..95];
        let mut c = RangeCursor::new(ranges.into_iter().map(Ok));
        let mut out = Vec::new();
        c.overlaps(0, 20, &mut out).unwrap();
        assert_eq!(out, vec![0..10, 15..20]);
        c.overlaps(20, 40, &mut out).unwrap();
        assert_eq!(out, vec![20..40]);
        c.overlaps(40, 60, &mut out).unwrap();
        assert!(out.is_empty());
        c.overlaps(80, 100, &mut out).unwrap();
        assert_eq!(out, vec![90..95]);
    }
}
