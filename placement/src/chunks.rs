//! Chunk boxes: how a sharded tensor is cut into the boxes a distributed checkpoint stores, and
//! which placements a set of saved boxes implies.
//!
//! A torch DCP chunk is a box (`ChunkStorageMetadata(offsets, sizes)` in
//! `torch/distributed/checkpoint/metadata.py`): one contiguous index range per tensor dim. A
//! `Shard` shard is one box; a `_StridedShard` shard generally is not (rank 0 of `[_S(0, 2)]` on 2
//! ranks holds rows `{0, 1, 4, 5}` of 8), and torch 2.15 saves it as the one box
//! `compute_local_shape_and_global_offset` gives, which overlaps its neighbours' ("overlapping
//! chunks" at save). The exact form is the cartesian product of the shard's runs per dim: rows
//! `[0, 2)` and `[4, 6)` as two boxes, both valid DCP chunks (a reader intersects boxes).
//!
//! A save stores each replicated shard once (`dedup_save_plans` in
//! `torch/distributed/checkpoint/_dedup_save_plans.py` keeps one copy of equal items; which rank
//! keeps it does not change the set of boxes) and never needs an empty box.
//!
//! ```
//! use placement::{chunks, parse_placements, DeviceMesh};
//! let mesh = DeviceMesh::new(vec![2]).unwrap();
//! let p = parse_placements("[_S(0, 2)]").unwrap();
//! let b = chunks::save_boxes(&[8, 6], &mesh, &p).unwrap();
//! // rank 0: rows [0, 2) and [4, 6); rank 1: rows [2, 4) and [6, 8)
//! let starts: Vec<(usize, usize)> = b.iter().map(|(r, c)| (*r, c.offsets[0])).collect();
//! assert_eq!(starts, vec![(0, 0), (0, 4), (1, 2), (1, 6)]);
//! let found = chunks::placements_fitting(&[8, 6], &mesh,
//!     &b.into_iter().map(|(_, c)| c).collect::<Vec<_>>()).unwrap();
//! assert_eq!(placement::format_placements(&found), "[_S(0, 2)]");
//! ```

use crate::error::Result;
use crate::index_set::IndexSet;
use crate::local::{local_shard, LocalShard};
use crate::mesh::DeviceMesh;
use crate::placement::Placement;

/// A box of a tensor: global start and extent per dim (DCP's `ChunkStorageMetadata`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkBox {
    /// Global index of the first element, per dim.
    pub offsets: Vec<usize>,
    /// Extent per dim.
    pub sizes: Vec<usize>,
}

impl ChunkBox {
    /// Number of elements (`prod(sizes)`; 1 for a 0-d box); `None` on overflow.
    pub fn numel(&self) -> Option<usize> {
        self.sizes.iter().try_fold(1usize, |a, &s| a.checked_mul(s))
    }

    /// True when the box holds no element.
    pub fn is_empty(&self) -> bool {
        self.sizes.contains(&0)
    }

    /// True when the box lies inside `shape` (same rank, `offset + size <= shape` per dim).
    pub fn inside(&self, shape: &[usize]) -> bool {
        self.offsets.len() == shape.len()
            && self.sizes.len() == shape.len()
            && self
                .offsets
                .iter()
                .zip(&self.sizes)
                .zip(shape)
                .all(|((&o, &s), &n)| o.checked_add(s).is_some_and(|e| e <= n))
    }

    /// The index sets of the box (one run per dim).
    pub fn sets(&self) -> Vec<IndexSet> {
        self.offsets
            .iter()
            .zip(&self.sizes)
            .map(|(&o, &s)| IndexSet::from_range(o..o + s))
            .collect()
    }
}

/// A box of a local shard and where it sits in the local tensor: `local_start[d]` is the local
/// position along dim `d` of the box's first element (the local tensor restricted to
/// `local_start[d] .. local_start[d] + sizes[d]` on every dim is the box's data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBox {
    /// The box in global indices.
    pub global: ChunkBox,
    /// Local position of its first element, per dim.
    pub local_start: Vec<usize>,
}

/// The boxes of one local shard: the cartesian product of its runs per dim, in local row-major
/// order of the runs (one box for a `Shard` / `Replicate` shard). `global_shape` gives the extent of
/// dims no mesh dim shards. An empty shard gives no box; a 0-d tensor gives one box with no dims.
pub fn shard_boxes(shard: &LocalShard, global_shape: &[usize]) -> Vec<LocalBox> {
    let sets: Vec<IndexSet> = (0..global_shape.len())
        .map(|d| shard.dim_indices(d, global_shape[d]))
        .collect();
    if sets.iter().any(IndexSet::is_empty) {
        return Vec::new();
    }
    // Per dim: (global start, local start, len) of each run.
    let runs: Vec<Vec<(usize, usize, usize)>> = sets
        .iter()
        .map(|s| {
            let mut pos = 0;
            s.runs()
                .iter()
                .map(|r| {
                    let x = (r.start, pos, r.end - r.start);
                    pos += r.end - r.start;
                    x
                })
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    let mut ix = vec![0usize; runs.len()];
    loop {
        let pick: Vec<(usize, usize, usize)> = ix.iter().zip(&runs).map(|(&i, r)| r[i]).collect();
        out.push(LocalBox {
            global: ChunkBox {
                offsets: pick.iter().map(|p| p.0).collect(),
                sizes: pick.iter().map(|p| p.2).collect(),
            },
            local_start: pick.iter().map(|p| p.1).collect(),
        });
        // Odometer over the run indices, last dim fastest.
        let mut d = runs.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            ix[d] += 1;
            if ix[d] < runs[d].len() {
                break;
            }
            ix[d] = 0;
        }
    }
}

/// True when the rank at `coordinate` stores its shard of a tensor with `placements`: its
/// coordinate is 0 on every mesh dim where the tensor is `Replicate` or `Partial` (one copy of each
/// replica group is saved, the lowest rank's, as `dedup_save_plans(save_to_lowest_rank=True)`).
pub fn saves_shard(placements: &[Placement], coordinate: &[usize]) -> bool {
    placements
        .iter()
        .zip(coordinate)
        .all(|(p, &c)| p.is_shard() || c == 0)
}

/// Every box a save of a tensor of `global_shape` with `placements` on `mesh` stores, with the rank
/// that writes it: each rank that [`saves_shard`] contributes its [`shard_boxes`], in rank order.
/// Together the boxes cover the tensor exactly once. Errors as [`local_shard`].
pub fn save_boxes(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
) -> Result<Vec<(usize, ChunkBox)>> {
    let mut out = Vec::new();
    for rank in 0..mesh.size() {
        let coord = mesh.coordinate(rank)?;
        if !saves_shard(placements, &coord) {
            continue;
        }
        let s = local_shard(global_shape, mesh, placements, &coord)?;
        out.extend(
            shard_boxes(&s, global_shape)
                .into_iter()
                .map(|b| (rank, b.global)),
        );
    }
    Ok(out)
}

/// The placements tried per mesh dim by [`placements_fitting`], simplest first: `R`, `S(d)` for
/// every dim, then `_S(d, sf)` for `sf` in 2..=4.
fn candidates(ndim: usize) -> Vec<Placement> {
    let mut v = vec![Placement::Replicate];
    v.extend((0..ndim).map(Placement::Shard));
    for sf in 2..=4 {
        v.extend((0..ndim).map(|dim| Placement::StridedShard {
            dim,
            split_factor: sf,
        }));
    }
    v
}

fn sorted_nonempty<'a>(boxes: impl IntoIterator<Item = &'a ChunkBox>) -> Vec<&'a ChunkBox> {
    let mut v: Vec<&ChunkBox> = boxes.into_iter().filter(|b| !b.is_empty()).collect();
    v.sort();
    v
}

/// Searches placement lists on `mesh` (one per mesh dim, each `R`, `S(d)` or `_S(d, sf)` with
/// `sf <= 4`; no `Partial`), simplest first (fewest sharded mesh dims, `S` before `_S`), for one
/// whose [`save_boxes`] are exactly `chunks` (as a set; empty boxes ignored). `None` when no
/// placement fits, e.g. chunks that overlap, leave a gap, or come from another mesh.
///
/// This is how a checker names the layout of a checkpoint whose metadata records only boxes:
/// chunks `[0:4, :]`, `[4:8, :]` of an `[8, 6]` tensor on 2 ranks are `[S(0)]`.
pub fn placements_fitting(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    chunks: &[ChunkBox],
) -> Option<Vec<Placement>> {
    let want = sorted_nonempty(chunks);
    // A dim along which the boxes start at different offsets must be sharded by some mesh dim.
    let varying: Vec<usize> = (0..global_shape.len())
        .filter(|&d| {
            want.windows(2)
                .any(|w| w[0].offsets.get(d) != w[1].offsets.get(d))
        })
        .collect();
    fitting(global_shape, mesh, |cand| {
        if !varying
            .iter()
            .all(|&d| cand.iter().any(|p| p.shard_dim() == Some(d)))
        {
            return Some(false);
        }
        let got = save_boxes(global_shape, mesh, cand).ok()?;
        Some(sorted_nonempty(got.iter().map(|(_, b)| b)) == want)
    })
}

/// Searches as [`placements_fitting`] for placements whose saved LOCAL SHAPES equal the chunk
/// sizes `sizes` (as a multiset; empty ones ignored), whatever their offsets: which layout of a
/// tensor of `global_shape` the chunks are consistent with. Used to name the placement a wrong
/// global shape came from (chunks `[8, 65, 12]` of a `[8, 65, 24]` tensor on 2 ranks: `[S(2)]`).
pub fn placements_with_chunk_sizes(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    sizes: &[Vec<usize>],
) -> Option<Vec<Placement>> {
    let mut want: Vec<&Vec<usize>> = sizes.iter().filter(|s| !s.contains(&0)).collect();
    want.sort();
    fitting(global_shape, mesh, |cand| {
        let got = save_boxes(global_shape, mesh, cand).ok()?;
        let mut g: Vec<&Vec<usize>> = got
            .iter()
            .map(|(_, b)| &b.sizes)
            .filter(|s| !s.contains(&0))
            .collect();
        g.sort();
        Some(g == want)
    })
}

/// Searches as [`placements_fitting`] for placements under which the rank at `coordinate` of
/// `mesh` holds exactly `indices` of a tensor of `global_shape` (one [`IndexSet`] per tensor dim,
/// in local order, as [`LocalShard::dim_indices`] gives them): the label that fits one rank's
/// piece. A `Partial` mesh dim of the true label shows as `R` here (both hold every index).
/// `None` when no candidate fits, e.g. index sets that are no `S` / `_S` shard of that mesh.
///
/// This names the right label when a piece's own label is wrong: the last two dims of a
/// transposed `[E, 2I, H]` piece of a native `[E, H, 2I]` tensor with `[S(1)]` hold every row and
/// half the columns, which is `[S(2)]`, not `[S(1)]`.
pub fn placements_giving(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    coordinate: &[usize],
    indices: &[IndexSet],
) -> Option<Vec<Placement>> {
    if indices.len() != global_shape.len() {
        return None;
    }
    fitting(global_shape, mesh, |cand| {
        let s = local_shard(global_shape, mesh, cand, coordinate).ok()?;
        Some(
            indices
                .iter()
                .enumerate()
                .all(|(d, want)| &s.dim_indices(d, global_shape[d]) == want),
        )
    })
}

/// The first candidate list (simplest first) for which `ok` returns `Some(true)`.
fn fitting(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    mut ok: impl FnMut(&[Placement]) -> Option<bool>,
) -> Option<Vec<Placement>> {
    let cands = candidates(global_shape.len());
    let m = mesh.ndim();
    // Every list of m candidates, ordered by (sharded mesh dims, strided ones, lexicographic).
    let total = cands.len().checked_pow(m as u32)?;
    let mut lists: Vec<(usize, usize, Vec<usize>)> = (0..total)
        .map(|mut code| {
            let mut idx = vec![0; m];
            for slot in idx.iter_mut().rev() {
                *slot = code % cands.len();
                code /= cands.len();
            }
            let sharded = idx.iter().filter(|&&i| i > 0).count();
            let strided = idx.iter().filter(|&&i| i > global_shape.len()).count();
            (sharded, strided, idx)
        })
        .collect();
    lists.sort();
    lists.into_iter().find_map(|(_, _, idx)| {
        let cand: Vec<Placement> = idx.iter().map(|&i| cands[i]).collect();
        (ok(&cand) == Some(true)).then_some(cand)
    })
}

/// The meshes a checkpoint saved by `world` ranks may have used, in the order a checker tries them:
/// `[world]`, then every factorisation into 2 and then 3 dims > 1 (`12`: `[12]`, `[2, 6]`,
/// `[3, 4]`, `[4, 3]`, `[6, 2]`, `[2, 2, 3]`, ...).
pub fn candidate_meshes(world: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![world.max(1)]];
    let divs: Vec<usize> = (2..world).filter(|&d| world.is_multiple_of(d)).collect();
    for &a in &divs {
        out.push(vec![a, world / a]);
    }
    for &a in &divs {
        for &b in &divs {
            if (world / a).is_multiple_of(b) && world / a / b > 1 {
                out.push(vec![a, b, world / a / b]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn mesh(s: &[usize]) -> DeviceMesh {
        DeviceMesh::new(s.to_vec()).unwrap()
    }

    #[test]
    fn boxes_cover_every_element_once_and_follow_local_order() {
        // [_S(0, 2), S(1)] on [2, 2] of a [8, 5] tensor.
        let m = mesh(&[2, 2]);
        let p = parse_placements("[_S(0, 2), S(1)]").unwrap();
        let mut seen = [0u8; 40];
        for (_, b) in save_boxes(&[8, 5], &m, &p).unwrap() {
            for i in b.offsets[0]..b.offsets[0] + b.sizes[0] {
                for j in b.offsets[1]..b.offsets[1] + b.sizes[1] {
                    seen[i * 5 + j] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        let s = local_shard(&[8, 5], &m, &p, &[1, 0]).unwrap();
        let b = shard_boxes(&s, &[8, 5]);
        // rank (1, 0): rows 2,3 then 6,7; cols 0..3
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].global.offsets.clone(), b[0].local_start.clone()),
            (vec![2, 0], vec![0, 0])
        );
        assert_eq!(
            (b[1].global.offsets.clone(), b[1].local_start.clone()),
            (vec![6, 0], vec![2, 0])
        );
    }

    fn held(shape: &[usize], m: &DeviceMesh, p: &[Placement], c: &[usize]) -> Vec<IndexSet> {
        let s = local_shard(shape, m, p, c).unwrap();
        (0..shape.len())
            .map(|d| s.dim_indices(d, shape[d]))
            .collect()
    }

    #[test]
    fn the_label_that_fits_a_piece_gives_its_index_sets() {
        // Whatever label made a piece, the one found gives the same index sets at that rank.
        let shape = [4, 6, 10];
        for (ms, text) in [
            (vec![2], "[S(1)]"),
            (vec![2], "[S(2)]"),
            (vec![2], "[_S(2, 2)]"),
            (vec![3], "[S(2)]"),
            (vec![2, 2], "[S(0), S(1)]"),
            (vec![2, 2], "[S(0), _S(2, 2)]"),
            (vec![2, 3], "[R, S(1)]"),
        ] {
            let m = mesh(&ms);
            let p = parse_placements(text).unwrap();
            for r in 0..m.size() {
                let c = m.coordinate(r).unwrap();
                let want = held(&shape, &m, &p, &c);
                let found = placements_giving(&shape, &m, &c, &want).unwrap();
                assert_eq!(held(&shape, &m, &found, &c), want, "{text} rank {r}");
            }
        }
        // The transpose that keeps S(1): [E, 2I, H] holds every row and half the columns.
        let m = mesh(&[2]);
        let right = held(&[4, 6, 10], &m, &parse_placements("[S(2)]").unwrap(), &[1]);
        let found = placements_giving(&[4, 6, 10], &m, &[1], &right).unwrap();
        assert_eq!(crate::format_placements(&found), "[S(2)]");
        // A partial sum holds every index, as R does.
        let all = held(&[4, 6], &m, &parse_placements("[P(sum)]").unwrap(), &[1]);
        let found = placements_giving(&[4, 6], &m, &[1], &all).unwrap();
        assert_eq!(crate::format_placements(&found), "[R]");
    }

    #[test]
    fn no_label_fits_index_sets_no_shard_gives() {
        let m = mesh(&[2]);
        // Rank 0 of every S / _S of dim 0 holds row 0.
        let odd = vec![IndexSet::from_range(1..3), IndexSet::full(3)];
        assert_eq!(placements_giving(&[4, 3], &m, &[0], &odd), None);
        // Wrong number of dims.
        assert_eq!(
            placements_giving(&[4, 3], &m, &[0], &[IndexSet::full(4)]),
            None
        );
    }

    #[test]
    fn replicas_are_saved_once_and_zero_d_is_one_box() {
        let m = mesh(&[2, 2]);
        let p = parse_placements("[R, S(0)]").unwrap();
        let b = save_boxes(&[4], &m, &p).unwrap();
        assert_eq!(b.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0, 1]);
        let z = save_boxes(&[], &m, &parse_placements("[R, R]").unwrap()).unwrap();
        assert_eq!(
            z,
            vec![(
                0,
                ChunkBox {
                    offsets: vec![],
                    sizes: vec![]
                }
            )]
        );
    }

    #[test]
    fn inference_names_the_layout_and_refuses_what_fits_nothing() {
        let m = mesh(&[2]);
        for text in ["[R]", "[S(0)]", "[S(1)]", "[S(2)]", "[_S(1, 2)]"] {
            let p = parse_placements(text).unwrap();
            let b: Vec<ChunkBox> = save_boxes(&[8, 5, 6], &m, &p)
                .unwrap()
                .into_iter()
                .map(|(_, b)| b)
                .collect();
            let found = placements_fitting(&[8, 5, 6], &m, &b).unwrap();
            assert_eq!(crate::format_placements(&found), text);
        }
        // The seed bug: chunks [8, 65, 12] at dim-1 offsets 0 and 65 of a claimed [8, 130, 12].
        let bug = vec![
            ChunkBox {
                offsets: vec![0, 0, 0],
                sizes: vec![8, 65, 12],
            },
            ChunkBox {
                offsets: vec![0, 65, 0],
                sizes: vec![8, 65, 12],
            },
        ];
        assert_eq!(
            placements_fitting(&[8, 130, 12], &m, &bug),
            Some(vec![Placement::Shard(1)])
        );
        let sizes: Vec<Vec<usize>> = bug.iter().map(|b| b.sizes.clone()).collect();
        assert_eq!(
            placements_with_chunk_sizes(&[8, 65, 24], &m, &sizes),
            Some(vec![Placement::Shard(2)])
        );
        // Overlap: nothing fits.
        let over = vec![
            ChunkBox {
                offsets: vec![0],
                sizes: vec![5],
            },
            ChunkBox {
                offsets: vec![3],
                sizes: vec![5],
            },
        ];
        assert_eq!(placements_fitting(&[8], &m, &over), None);
        // EP x FSDP on 4 ranks: only a 2-D mesh fits.
        let p = parse_placements("[S(0), S(1)]").unwrap();
        let b: Vec<ChunkBox> = save_boxes(&[8, 6], &mesh(&[2, 2]), &p)
            .unwrap()
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        assert_eq!(placements_fitting(&[8, 6], &mesh(&[4]), &b), None);
        assert_eq!(placements_fitting(&[8, 6], &mesh(&[2, 2]), &b), Some(p));
    }

    #[test]
    fn candidate_meshes_factor_the_world() {
        assert_eq!(candidate_meshes(1), vec![vec![1]]);
        assert_eq!(candidate_meshes(2), vec![vec![2]]);
        assert_eq!(candidate_meshes(4), vec![vec![4], vec![2, 2]]);
        let m8 = candidate_meshes(8);
        assert!(m8.contains(&vec![2, 4]) && m8.contains(&vec![2, 2, 2]));
    }
}
