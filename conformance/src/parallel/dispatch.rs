//! Expert-parallel token exchange (torchtitan `ExpertParallel._token_dispatch` /
//! `_token_combine`, `generate_permute_indices`): each rank's routed rows, grouped by global expert,
//! go to the rank that owns the expert (contiguous ranges, the `S(0)` chunks of `E`); the receiver
//! reorders them from rank-major to expert-major for the grouped GEMM, and the combine undoes both.
//! Every step has its adjoint, so the backward is the same exchange reversed.

use super::shards::{comm_tensor, from_comm};
use collectives::autograd::{AllToAllV, CollectiveFunction};
use collectives::{Communicator, CommunicatorExt};
use ndarray::{Array2, ArrayView2, Axis};
use std::ops::Range;

/// The experts each EP rank owns: the `torch.chunk` ranges of `0..num_experts` over `ep` ranks.
pub fn expert_ranges(num_experts: usize, ep: usize) -> Result<Vec<Range<usize>>, String> {
    (0..ep)
        .map(|r| {
            placement::chunk(num_experts, ep, r)
                .map(|(len, start)| start..start + len)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// One dispatch: the exchange's split sizes and the rank-major -> expert-major reorder.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The dispatch all_to_all (`None` without EP: every expert is local).
    a2a: Option<AllToAllV>,
    /// Expert-major position `i` -> rank-major received row.
    order: Vec<usize>,
    /// `[E_l + 1]` exclusive scan of the received rows per local expert.
    pub offsets: Vec<usize>,
    /// The experts this rank owns.
    pub local_experts: Range<usize>,
}

impl Dispatch {
    /// Plans the exchange from this rank's per-expert row counts `[E]` (rows grouped by expert in
    /// ascending order, as [`moe_kernels::Permutation`] lays them out). Collective over `ep`
    /// (one all_to_all of the counts).
    pub fn new(ep: Option<&dyn Communicator>, counts: &[usize]) -> Result<Self, String> {
        let Some(ep) = ep else {
            let mut offsets = vec![0];
            for &c in counts {
                offsets.push(offsets.last().copied().unwrap_or(0) + c);
            }
            let n = offsets.last().copied().unwrap_or(0);
            return Ok(Dispatch {
                a2a: None,
                order: (0..n).collect(),
                offsets,
                local_experts: 0..counts.len(),
            });
        };
        let ranges = expert_ranges(counts.len(), ep.size())?;
        let mine = ranges[ep.rank()].clone();
        let send_counts: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let recv_counts = vec![mine.len(); ep.size()];
        let sent: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let got = ep
            .all_to_all(&sent, &send_counts, &recv_counts)
            .map_err(|e| format!("EP dispatch: exchanging per-expert counts: {e}"))?;
        // c[s][e]: rows rank s sends for local expert e.
        let c: Vec<Vec<usize>> = got
            .chunks(mine.len().max(1))
            .take(ep.size())
            .map(|row| row.iter().map(|&v| v as usize).collect())
            .collect();
        let c = if mine.is_empty() {
            vec![Vec::new(); ep.size()]
        } else {
            c
        };
        let send_splits: Vec<usize> = ranges
            .iter()
            .map(|r| counts[r.clone()].iter().sum())
            .collect();
        let recv_splits: Vec<usize> = c.iter().map(|row| row.iter().sum()).collect();
        // Start of block (s, e) in the rank-major received rows.
        let mut order = Vec::new();
        let mut offsets = vec![0];
        let src_start: Vec<usize> = recv_splits
            .iter()
            .scan(0, |acc, &n| {
                let s = *acc;
                *acc += n;
                Some(s)
            })
            .collect();
        for e in 0..mine.len() {
            for s in 0..ep.size() {
                let start = src_start[s] + c[s][..e].iter().sum::<usize>();
                order.extend(start..start + c[s][e]);
            }
            offsets.push(order.len());
        }
        Ok(Dispatch {
            a2a: Some(AllToAllV {
                send_splits,
                recv_splits,
            }),
            order,
            offsets,
            local_experts: mine,
        })
    }

    fn exchange(
        &self,
        ep: Option<&dyn Communicator>,
        rows: ArrayView2<f32>,
        reverse: bool,
    ) -> Result<Array2<f32>, String> {
        match (&self.a2a, ep) {
            (Some(op), Some(ep)) => {
                let t = comm_tensor(&rows.to_owned())?;
                let out = if reverse {
                    op.backward(ep, &t)
                } else {
                    op.forward(ep, &t)
                }
                .map_err(|e| format!("EP all_to_all: {e}"))?;
                let mut a: Array2<f32> = from_comm(out)?;
                if a.nrows() == 0 {
                    a = Array2::zeros((0, rows.ncols()));
                }
                Ok(a)
            }
            _ => Ok(rows.to_owned()),
        }
    }

    /// Dispatch: `[N, H]` local rows (grouped by global expert) -> `[M, H]` rows of the local
    /// experts, expert-major.
    pub fn dispatch(
        &self,
        ep: Option<&dyn Communicator>,
        rows: ArrayView2<f32>,
    ) -> Result<Array2<f32>, String> {
        let recv = self.exchange(ep, rows, false)?;
        Ok(recv.select(Axis(0), &self.order))
    }

    /// Adjoint of [`Dispatch::dispatch`]: `[M, H]` expert-major gradients -> `[N, H]` local rows.
    pub fn dispatch_backward(
        &self,
        ep: Option<&dyn Communicator>,
        grad: ArrayView2<f32>,
    ) -> Result<Array2<f32>, String> {
        let rank_major = self.unorder(grad);
        self.exchange(ep, rank_major.view(), true)
    }

    /// Combine: `[M, H]` expert-major outputs -> `[N, H]` back on the rows' origin ranks.
    pub fn combine(
        &self,
        ep: Option<&dyn Communicator>,
        rows: ArrayView2<f32>,
    ) -> Result<Array2<f32>, String> {
        let rank_major = self.unorder(rows);
        self.exchange(ep, rank_major.view(), true)
    }

    /// Adjoint of [`Dispatch::combine`]: `[N, H]` -> `[M, H]` expert-major.
    pub fn combine_backward(
        &self,
        ep: Option<&dyn Communicator>,
        grad: ArrayView2<f32>,
    ) -> Result<Array2<f32>, String> {
        self.dispatch(ep, grad)
    }

    /// Expert-major -> rank-major (inverse of the `order` gather).
    fn unorder(&self, rows: ArrayView2<f32>) -> Array2<f32> {
        let mut out = Array2::<f32>::zeros(rows.raw_dim());
        for (i, &r) in self.order.iter().enumerate() {
            out.row_mut(r).assign(&rows.row(i));
        }
        out
    }
}
