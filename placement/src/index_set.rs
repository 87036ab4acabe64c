//! Index sets in LOCAL order, stored as runs of consecutive indices.
//!
//! A rank's slice of a tensor dim is not contiguous in general (`_StridedShard`), and its local
//! element order is not sorted (`[SS(0,2), S(0)]` can hold `[6, 7, 14]`, then a further split
//! keeps order). So a shard is a list of runs, in the order the rank stores them.

use std::ops::Range;

use crate::error::{PlacementError, Result};

/// Ordered set of global indices along one tensor dim, in local (storage) order.
/// Invariant: no empty run, and no run starts where the previous one ends (those are merged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexSet {
    runs: Vec<Range<usize>>,
}

impl IndexSet {
    /// The empty set.
    pub fn empty() -> Self {
        IndexSet { runs: Vec::new() }
    }

    /// `0..n` (an unsharded dim of extent `n`).
    pub fn full(n: usize) -> Self {
        IndexSet::from_range(0..n)
    }

    /// One run (empty when `range` is empty): a contiguous `offset..offset+len` slice.
    pub fn from_range(range: Range<usize>) -> Self {
        if range.start >= range.end {
            IndexSet::empty()
        } else {
            IndexSet { runs: vec![range] }
        }
    }

    /// From runs in local order; empty runs are dropped and a run starting where the previous
    /// one ends is merged into it.
    pub fn from_runs(runs: Vec<Range<usize>>) -> Self {
        let mut out: Vec<Range<usize>> = Vec::with_capacity(runs.len());
        for r in runs {
            if r.start >= r.end {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        IndexSet { runs: out }
    }

    /// From explicit indices in local order (consecutive ones become runs, as
    /// [`IndexSet::from_runs`] merges them). `usize::MAX` is no index (`MAX..MAX + 1` overflows)
    /// and is dropped.
    pub fn from_indices(idx: &[usize]) -> Self {
        IndexSet::from_runs(idx.iter().map(|&i| i..i.saturating_add(1)).collect())
    }

    /// The runs, in local order.
    pub fn runs(&self) -> &[Range<usize>] {
        &self.runs
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// True when the set holds no index.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// True when the set is one run (a plain `(offset, len)` slice) or empty.
    pub fn is_contiguous(&self) -> bool {
        self.runs.len() <= 1
    }

    /// Indices in local order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(|r| r.clone())
    }

    /// Indices in local order, collected.
    pub fn to_vec(&self) -> Vec<usize> {
        self.iter().collect()
    }

    /// First index in local order (the DTensor global offset of a non-empty shard).
    pub fn first(&self) -> Option<usize> {
        self.runs.first().map(|r| r.start)
    }

    /// Index at local position `pos`, or `None` past the end.
    pub fn get(&self, pos: usize) -> Option<usize> {
        let mut rest = pos;
        for r in &self.runs {
            let n = r.end - r.start;
            if rest < n {
                return Some(r.start + rest);
            }
            rest -= n;
        }
        None
    }

    /// `self[inner[i]]` for each `i`: the positions `inner` taken within this set (nested
    /// sharding: `inner` is the split of the current local extent). Errors when a position in
    /// `inner` is `>= self.len()`.
    pub fn select(&self, inner: &IndexSet) -> Result<IndexSet> {
        let len = self.len();
        // Local start position of each run of self.
        let mut starts = Vec::with_capacity(self.runs.len());
        let mut acc = 0usize;
        for r in &self.runs {
            starts.push(acc);
            acc += r.end - r.start;
        }
        let mut out = Vec::new();
        for q in &inner.runs {
            if q.end > len {
                return Err(PlacementError::IndexOutOfRange {
                    position: q.end - 1,
                    len,
                });
            }
            // Run of self holding position q.start.
            let mut k = starts.partition_point(|&s| s <= q.start) - 1;
            let mut pos = q.start;
            while pos < q.end {
                let run = &self.runs[k];
                let within = pos - starts[k];
                let take = (run.end - run.start - within).min(q.end - pos);
                out.push(run.start + within..run.start + within + take);
                pos += take;
                k += 1;
            }
        }
        Ok(IndexSet::from_runs(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_merged_and_kept_in_local_order() {
        let s = IndexSet::from_runs(vec![4..6, 6..7, 3..3, 0..2, 2..3]);
        assert_eq!(s.runs(), &[4..7, 0..3]);
        assert_eq!(s.to_vec(), vec![4, 5, 6, 0, 1, 2]);
        assert_eq!(s.len(), 6);
        assert_eq!(s.first(), Some(4));
        assert_eq!(s.get(3), Some(0));
        assert_eq!(s.get(6), None);
        let t = IndexSet::from_indices(&[0, 1, 5, 6, 2]);
        assert_eq!(t.runs(), &[0..2, 5..7, 2..3]);
        assert!(IndexSet::full(0).is_empty());
        assert_eq!(IndexSet::full(0), IndexSet::empty());
        assert_eq!(IndexSet::full(0).first(), None);
        assert!(IndexSet::full(5).is_contiguous());
    }

    #[test]
    fn select_matches_naive_indexing() {
        let outer = IndexSet::from_indices(&[6, 7, 14, 0, 1, 2, 9]);
        let inner = IndexSet::from_indices(&[1, 2, 3, 6, 0]);
        let naive: Vec<usize> = inner.iter().map(|i| outer.to_vec()[i]).collect();
        assert_eq!(outer.select(&inner).unwrap().to_vec(), naive);
        assert_eq!(naive, vec![7, 14, 0, 9, 6]);
        // Position 7 is the first one past the 7 indices held.
        assert!(matches!(
            outer.select(&IndexSet::full(8)),
            Err(PlacementError::IndexOutOfRange {
                position: 7,
                len: 7
            })
        ));
        assert!(matches!(
            outer.select(&IndexSet::from_range(3..10)),
            Err(PlacementError::IndexOutOfRange {
                position: 9,
                len: 7
            })
        ));
        assert_eq!(outer.select(&IndexSet::empty()).unwrap(), IndexSet::empty());
    }
}
