//! Token permutation of the grouped expert pipeline: per-expert counts, exclusive scan, stable
//! scatter of the `T * k` (token, slot) pairs into expert-contiguous rows, and its inverse.
//!
//! Flat slot `s = t * k + j` is token `t`'s `j`-th choice. Rows of expert `e` are
//! `offsets[e]..offsets[e + 1]`, in ascending slot order (stable), so the grouped GEMM sees each
//! expert's tokens in token order, as the reference loop does.

use std::ops::Range;

use ndarray::{Array2, ArrayView2};

use crate::error::{KernelError, Result};

/// A stable permutation of the `T * k` routed slots grouped by expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permutation {
    /// `[E]` tokens routed to each expert; sums to `T * k`.
    pub counts: Vec<usize>,
    /// `[E + 1]` exclusive scan of `counts`; `offsets[E] = T * k`.
    pub offsets: Vec<usize>,
    /// `[T * k]` permuted row -> flat slot `t * k + j`.
    pub slot_of_row: Vec<usize>,
    /// `[T * k]` flat slot -> permuted row (the inverse of `slot_of_row`).
    pub row_of_slot: Vec<usize>,
    /// `k`, to map a slot back to its token (`slot / k`).
    pub top_k: usize,
}

impl Permutation {
    /// Builds the permutation from `top_k_index` `[T, k]` for `num_experts` experts.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `top_k_index` when an id is `>= num_experts`.
    pub fn from_top_k_index(top_k_index: ArrayView2<usize>, num_experts: usize) -> Result<Self> {
        let top_k = top_k_index.ncols();
        let mut counts = vec![0usize; num_experts];
        for &e in top_k_index.iter() {
            match counts.get_mut(e) {
                Some(c) => *c += 1,
                None => {
                    return Err(KernelError::ShapeMismatch {
                        tensor: "top_k_index",
                        expected: format!("expert ids < E={num_experts}"),
                        got: vec![e],
                    })
                }
            }
        }
        let mut offsets = Vec::with_capacity(num_experts + 1);
        let mut acc = 0usize;
        offsets.push(0);
        for &c in &counts {
            acc += c;
            offsets.push(acc);
        }
        let mut fill = offsets[..num_experts].to_vec();
        let mut slot_of_row = vec![0usize; acc];
        let mut row_of_slot = vec![0usize; acc];
        // Row-major iteration = ascending slot order, so the scatter is stable.
        for (slot, &e) in top_k_index.iter().enumerate() {
            let row = fill[e];
            fill[e] += 1;
            slot_of_row[row] = slot;
            row_of_slot[slot] = row;
        }
        Ok(Permutation {
            counts,
            offsets,
            slot_of_row,
            row_of_slot,
            top_k,
        })
    }

    /// Permuted rows of expert `e` (empty for an expert with no tokens or `e >= E`).
    pub fn rows(&self, e: usize) -> Range<usize> {
        match (self.offsets.get(e), self.offsets.get(e + 1)) {
            (Some(&a), Some(&b)) => a..b,
            _ => 0..0,
        }
    }

    /// Token of permuted row `row` (`slot_of_row[row] / k`).
    pub fn token_of_row(&self, row: usize) -> usize {
        self.slot_of_row[row] / self.top_k.max(1)
    }

    /// `[N]` token of every permuted row (`slot_of_row[r] / k`): the gather index of
    /// [`crate::fast::permute_forward`] (`xp[r] = x[token_of_rows[r]]`).
    pub fn token_of_rows(&self) -> Vec<usize> {
        (0..self.slot_of_row.len())
            .map(|r| self.token_of_row(r))
            .collect()
    }

    /// `[T, k]` permuted row of token `t`'s `j`-th choice (`row_of_slot` reshaped): the index
    /// [`crate::fast::combine_forward`] and [`crate::fast::permute_backward`] take. With `k = 0`
    /// the result is `[0, 0]`.
    pub fn row_of_slot_matrix(&self) -> Array2<usize> {
        let k = self.top_k;
        let tokens = self.row_of_slot.len().checked_div(k).unwrap_or(0);
        let data = self.row_of_slot[..tokens * k].to_vec();
        Array2::from_shape_vec((tokens, k), data).unwrap_or_else(|_| Array2::zeros((0, k)))
    }
}
