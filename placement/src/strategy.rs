//! Output placements of the ops whose sharding PyTorch 2.15 picks by a strategy search: slice /
//! narrow, select, cat and split. Ported rule by rule; checked against PyTorch by the `view`
//! oracle cases with ops `narrow`, `select`, `cat`, `split`.
//!
//! How PyTorch decides (torch 2.15, `torch/distributed/tensor/`):
//!
//! 1. The op's single-dim rule lists, for ONE mesh dim, the allowed `[outputs.., inputs..]`
//!    placements (`_ops/_tensor_ops.py`: `slice_single_dim_strategy`,
//!    `select_int_single_dim_strategy`, `cat_single_dim_strategy`, `split_single_dim_strategy`):
//!    a shard of every dim except the touched one, passed through (`S(d)` -> `S(d)`, select moves
//!    later dims down by one), and `P(op)` -> `P(op)` for sum, avg, min, max. A slice that is
//!    statically the whole dim (start 0, end n, step 1) also keeps a shard of that dim.
//! 2. `_ops/single_dim_strategy.py`: the all-`R` rule is put first; shard placeholders are filled
//!    with every shard kind the inputs carry (`S`, and `_S` with each split factor seen).
//! 3. `_ops/utils.py` `expand_to_full_mesh_op_strategy`: every combination of rules over the mesh
//!    dims (`itertools.product`, last mesh dim fastest); combinations that mix Partial kinds (other
//!    than sum with avg) are dropped, and so are those whose input placements are not shardable
//!    (`is_tensor_shardable`: each sharded dim at least as long as its number of shards, times the
//!    split factor for `_S`), except, for slice and select (`allow_uneven_sharding`), the input's
//!    own placements.
//! 4. Each combination is costed by `redistribute_cost` (`_collective_utils.py`): 0 from an
//!    all-`R` input or to the same placements; infinite to or from `_S` otherwise; else the sum
//!    over the greedy planner's steps of `_compute_placement_transition_cost` (all-gather,
//!    all-to-all = all-gather + 1, all-reduce, reduce-scatter latency/bandwidth model of an
//!    NVLink/inter-host mesh; `R` -> `S` free and divides the bytes; `S` -> `P` and `P` -> other
//!    `P` infinite).
//! 5. `_sharding_prop.py` `_select_min_cost_strategy`: the last zero-cost combination that keeps
//!    the inputs as they are; else the first zero-cost one; else the first of minimal cost.
//!    The inputs are redistributed to that combination's input placements, and its output
//!    placements are the result.
//!
//! The cost model depends on the element size and on how many devices share a host
//! ([`CostModel`]); a CPU mesh counts 1 device per host (`torch.cpu.device_count()`), so every
//! mesh dim whose size, times the sizes of the mesh dims after it, exceeds 1 is "inter-host".

pub use crate::cost::CostModel;
use crate::cost::{mesh_topo, num_shards, transition_cost};
use crate::error::{PlacementError, Result};
use crate::local::check_placements;
use crate::mesh::DeviceMesh;
use crate::placement::{check_partial_ops, format_placements, normalize_dim, PartialOp, Placement};
use crate::redistribute::greedy_steps;

/// The strategy PyTorch picks for one op call.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyChoice {
    /// Output placements, one list per output (split has one per chunk, the others one).
    pub outputs: Vec<Vec<Placement>>,
    /// Placements each tensor input is redistributed to before the local op runs (the given
    /// placements when nothing moves).
    pub inputs: Vec<Vec<Placement>>,
    /// True when some input had to be redistributed.
    pub redistributed: bool,
    /// The chosen combination's cost in PyTorch's model (microseconds; 0 when nothing moves,
    /// infinite when only `_S` transitions were left).
    pub cost: f64,
}

/// How `torch.split` cuts the dim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitSizes {
    /// `torch.split(x, size, dim)` (`aten.split.Tensor`): chunks of `size`, the last smaller.
    Size(usize),
    /// `torch.split(x, [s0, s1, ..], dim)` (`aten.split_with_sizes`): the sizes must sum to the dim.
    Sections(Vec<usize>),
}

/// One slot of a single-dim rule: a fixed placement, or a shard placeholder of a tensor dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Fixed(Placement),
    Shard(usize),
}

const PASS_THROUGH: [PartialOp; 4] = [
    PartialOp::Sum,
    PartialOp::Avg,
    PartialOp::Min,
    PartialOp::Max,
];

fn rejected(op: String, shape: &[usize], p: &[Placement], reason: String) -> PlacementError {
    PlacementError::ViewRejected {
        op,
        shape: shape.to_vec(),
        placements: format_placements(p),
        reason,
    }
}

/// `redistribute_cost(current, target)` (`_collective_utils.py`) for a tensor of `shape`.
fn redistribute_cost(
    shape: &[usize],
    sizes: &[usize],
    cur: &[Placement],
    tgt: &[Placement],
    model: &CostModel,
) -> f64 {
    if cur.iter().all(Placement::is_replicate) || cur == tgt {
        return 0.0;
    }
    // `shard_order` is None for specs with `_StridedShard` (use_strided_shard_as_shard_order).
    if cur.iter().chain(tgt).any(Placement::is_strided_shard) {
        return f64::INFINITY;
    }
    let shards = num_shards(cur, sizes);
    let total_bytes = (model.elem_size * shape.iter().product::<usize>()) as f64;
    let mut bytes = total_bytes / shards as f64 / 1024.0 / 1024.0 / 1024.0;
    let topo = mesh_topo(sizes, model);
    let mut cost = 0.0;
    for (m, from, to) in greedy_steps(sizes, cur, tgt) {
        let (c, b) = transition_cost(from, to, sizes[m], topo[m], bytes);
        if c == f64::INFINITY {
            return f64::INFINITY;
        }
        bytes = b;
        cost += c;
    }
    cost
}

/// `is_tensor_shardable` (`_ops/utils.py`).
fn is_shardable(shape: &[usize], sizes: &[usize], p: &[Placement]) -> bool {
    let mut shards = vec![1usize; shape.len()];
    for (m, q) in p.iter().enumerate() {
        if let Some(d) = q.shard_dim() {
            if d >= shape.len() {
                return false;
            }
            shards[d] *= sizes[m];
            let lower = shards[d] * q.split_factor().unwrap_or(1);
            if shape[d] < lower {
                return false;
            }
        }
    }
    true
}

fn mixes_partials(p: &[Placement]) -> bool {
    let mut ops: Vec<PartialOp> = p.iter().filter_map(Placement::partial_op).collect();
    ops.sort_by_key(|o| o.as_str());
    ops.dedup();
    ops.len() > 1
        && !(ops.len() == 2 && ops.contains(&PartialOp::Sum) && ops.contains(&PartialOp::Avg))
}

/// The search of steps 2 to 5 of the module doc over `rules` (`[outputs.., inputs..]` slots).
fn search(
    mesh: &DeviceMesh,
    inputs: &[(&[usize], &[Placement])],
    mut rules: Vec<Vec<Slot>>,
    num_outputs: usize,
    allow_uneven: bool,
    model: &CostModel,
) -> Result<StrategyChoice> {
    let sizes = mesh.shape();
    let width = num_outputs + inputs.len();
    // `_insert_single_dim_replication_strategy`.
    if !rules
        .iter()
        .any(|r| r.iter().all(|s| *s == Slot::Fixed(Placement::Replicate)))
    {
        rules.insert(0, vec![Slot::Fixed(Placement::Replicate); width]);
    }
    // `_fill_single_dim_strategy_placeholders`: one builder per shard kind the inputs carry
    // (plain `S` first, then `_S` by split factor in order of appearance).
    let mut builders: Vec<Option<usize>> = Vec::new();
    if inputs
        .iter()
        .any(|(_, p)| p.iter().any(|q| matches!(q, Placement::Shard(_))))
    {
        builders.push(None);
    }
    for (_, p) in inputs {
        for q in p.iter() {
            if let Some(sf) = q.split_factor() {
                if !builders.contains(&Some(sf)) {
                    builders.push(Some(sf));
                }
            }
        }
    }
    let mut expanded: Vec<Vec<Placement>> = Vec::new();
    for r in &rules {
        if r.iter().any(|s| matches!(s, Slot::Shard(_))) {
            for b in &builders {
                expanded.push(
                    r.iter()
                        .map(|s| match (s, b) {
                            (Slot::Fixed(p), _) => *p,
                            (Slot::Shard(d), None) => Placement::Shard(*d),
                            (Slot::Shard(d), Some(sf)) => Placement::StridedShard {
                                dim: *d,
                                split_factor: *sf,
                            },
                        })
                        .collect(),
                );
            }
        } else {
            expanded.push(
                r.iter()
                    .map(|s| match s {
                        Slot::Fixed(p) => *p,
                        Slot::Shard(_) => unreachable!("placeholder rules are expanded above"),
                    })
                    .collect(),
            );
        }
    }
    // `expand_to_full_mesh_op_strategy` + `_select_min_cost_strategy`.
    let nd = sizes.len();
    let mut idx = vec![0usize; nd];
    let mut candidates: Vec<(Vec<Vec<Placement>>, f64, bool)> = Vec::new();
    loop {
        let specs: Vec<Vec<Placement>> = (0..width)
            .map(|j| (0..nd).map(|m| expanded[idx[m]][j]).collect())
            .collect();
        let ok = !specs.iter().any(|s| mixes_partials(s))
            && inputs.iter().enumerate().all(|(i, (shape, p))| {
                let cand = &specs[num_outputs + i];
                is_shardable(shape, sizes, cand) || (allow_uneven && cand.as_slice() == *p)
            });
        if ok {
            let mut cost = 0.0;
            for (i, (shape, p)) in inputs.iter().enumerate() {
                cost += redistribute_cost(shape, sizes, p, &specs[num_outputs + i], model);
            }
            let moves = inputs
                .iter()
                .enumerate()
                .any(|(i, (_, p))| specs[num_outputs + i].as_slice() != *p);
            candidates.push((specs, cost, moves));
        }
        // next combination, last mesh dim fastest
        let mut m = nd;
        loop {
            if m == 0 {
                break;
            }
            m -= 1;
            idx[m] += 1;
            if idx[m] < expanded.len() {
                break;
            }
            idx[m] = 0;
            if m == 0 {
                m = usize::MAX;
                break;
            }
        }
        if m == usize::MAX || nd == 0 {
            break;
        }
    }
    let pick = if candidates.len() == 1 {
        0
    } else {
        let keep = candidates.iter().rposition(|c| c.1 == 0.0 && !c.2);
        let zero = candidates.iter().position(|c| c.1 == 0.0 && c.2);
        match (keep, zero) {
            (Some(k), _) => k,
            (None, Some(z)) => z,
            (None, None) => {
                let mut best = 0;
                for (i, c) in candidates.iter().enumerate() {
                    if c.1 < candidates[best].1 {
                        best = i;
                    }
                }
                best
            }
        }
    };
    let (specs, cost, moves) = candidates.swap_remove(pick);
    let mut specs = specs;
    let ins = specs.split_off(num_outputs);
    Ok(StrategyChoice {
        outputs: specs,
        inputs: ins,
        redistributed: moves,
        cost,
    })
}

fn check_input(mesh: &DeviceMesh, shape: &[usize], p: &[Placement]) -> Result<()> {
    check_placements(mesh, p, shape.len())?;
    check_partial_ops(p)
}

fn partial_rules(width: usize) -> impl Iterator<Item = Vec<Slot>> {
    PASS_THROUGH
        .into_iter()
        .map(move |op| vec![Slot::Fixed(Placement::Partial(op)); width])
}

/// `x[start:end:step]` along `dim` (`aten.slice.Tensor`) on a DTensor of global `shape`: the
/// strategy PyTorch picks. `start`/`end` are Python-style (`None` = 0 / the end, negative counts
/// from the end, past-the-end clamps); `step` must be positive.
///
/// Rule (`slice_single_dim_strategy`, `_ops/_tensor_ops.py`; search: module doc): shards of other
/// dims and `P(sum|avg|min|max)` pass through; a shard of `dim` only when the slice is statically
/// the whole dim. `allow_uneven_sharding`. Errors: placements that do not fit, `dim` out of range,
/// `step <= 0`.
#[allow(clippy::too_many_arguments)] // aten.slice.Tensor's arguments, plus the mesh and the cost model
pub fn slice_strategy(
    shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    dim: i64,
    start: Option<i64>,
    end: Option<i64>,
    step: i64,
    model: &CostModel,
) -> Result<StrategyChoice> {
    check_input(mesh, shape, placements)?;
    let d = normalize_dim(dim, shape.len())?;
    if step <= 0 {
        return Err(rejected(
            format!("slice({dim}, {start:?}, {end:?}, {step})"),
            shape,
            placements,
            "slice step must be positive".to_string(),
        ));
    }
    let n = shape[d] as i64;
    let start = start.unwrap_or(0);
    let end = match end {
        Some(e) if e <= n => e,
        _ => n,
    };
    let start = if start < 0 { start + n } else { start };
    let end = if end < 0 { end + n } else { end };
    let whole = start == 0 && end == n && step == 1;
    let mut rules: Vec<Vec<Slot>> = (0..shape.len())
        .filter(|&e| e != d || whole)
        .map(|e| vec![Slot::Shard(e), Slot::Shard(e)])
        .collect();
    rules.extend(partial_rules(2));
    search(mesh, &[(shape, placements)], rules, 1, true, model)
}

/// `x.narrow(dim, start, length)` (decomposes to `aten.slice.Tensor(dim, start, start + length)`;
/// negative `start` counts from the end): see [`slice_strategy`]. Errors as `torch.narrow`:
/// `start` outside `-n..=n`, negative `length`, `start + length > n`.
pub fn narrow_strategy(
    shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    dim: i64,
    start: i64,
    length: i64,
    model: &CostModel,
) -> Result<StrategyChoice> {
    check_input(mesh, shape, placements)?;
    let d = normalize_dim(dim, shape.len())?;
    let n = shape[d] as i64;
    let bad = |reason: &str| {
        Err(rejected(
            format!("narrow({dim}, {start}, {length})"),
            shape,
            placements,
            reason.to_string(),
        ))
    };
    if start < -n || start > n {
        return bad("start out of range");
    }
    let start = if start < 0 { start + n } else { start };
    if length < 0 {
        return bad("narrow(): length must be non-negative");
    }
    if start + length > n {
        return bad("start + length exceeds the dimension size");
    }
    slice_strategy(
        shape,
        mesh,
        placements,
        dim,
        Some(start),
        Some(start + length),
        1,
        model,
    )
}

/// `x.select(dim, index)` (`aten.select.int`): the strategy PyTorch picks.
///
/// Rule (`select_int_single_dim_strategy`, `_ops/_tensor_ops.py`): shards of dims before `dim`
/// keep their dim, shards after it move down by one, `P(sum|avg|min|max)` pass through; a shard
/// of `dim` itself has no rule, so the search replicates it (module doc). `allow_uneven_sharding`.
/// Errors: placements that do not fit, `dim` out of range, `index` outside `-n..n`.
pub fn select_strategy(
    shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    dim: i64,
    index: i64,
    model: &CostModel,
) -> Result<StrategyChoice> {
    check_input(mesh, shape, placements)?;
    let d = normalize_dim(dim, shape.len())?;
    let n = shape[d] as i64;
    if index < -n || index >= n {
        return Err(rejected(
            format!("select({dim}, {index})"),
            shape,
            placements,
            format!("index {index} out of range for dimension {d} of size {n}"),
        ));
    }
    let mut rules: Vec<Vec<Slot>> = (0..shape.len())
        .filter(|&e| e != d)
        .map(|e| vec![Slot::Shard(if e < d { e } else { e - 1 }), Slot::Shard(e)])
        .collect();
    rules.extend(partial_rules(2));
    search(mesh, &[(shape, placements)], rules, 1, true, model)
}

/// `torch.cat(inputs, dim)` (`aten.cat.default`) of DTensors with global `shapes` and
/// `placements` (one each): the strategy PyTorch picks.
///
/// Rule (`cat_single_dim_strategy`, `_ops/_tensor_ops.py`): shards of dims other than `dim` and
/// `P(sum|avg|min|max)` pass through when every input has them; a legacy empty input (shape
/// `[0]`) stays `R` in every rule (so `cat` of replicated `[0]` tensors gives `P(max)`: the last
/// zero-cost rule). Not `allow_uneven_sharding`: even the inputs' own placements need every
/// sharded dim at least as long as its number of shards. Errors: no inputs, placements that do
/// not fit, inputs of different rank or sizes off `dim`, `dim` out of range.
pub fn cat_strategy(
    shapes: &[Vec<usize>],
    mesh: &DeviceMesh,
    placements: &[Vec<Placement>],
    dim: i64,
    model: &CostModel,
) -> Result<StrategyChoice> {
    let first = shapes.first().ok_or_else(|| {
        rejected(
            format!("cat({dim})"),
            &[],
            &[],
            "torch.cat needs at least one tensor".to_string(),
        )
    })?;
    if shapes.len() != placements.len() {
        return Err(rejected(
            format!("cat({dim})"),
            first,
            &[],
            format!(
                "{} shapes, {} placement lists",
                shapes.len(),
                placements.len()
            ),
        ));
    }
    for (s, p) in shapes.iter().zip(placements) {
        check_input(mesh, s, p)?;
    }
    let legacy: Vec<bool> = shapes.iter().map(|s| s.as_slice() == [0]).collect();
    let real: Vec<&Vec<usize>> = shapes
        .iter()
        .zip(&legacy)
        .filter(|(_, &l)| !l)
        .map(|(s, _)| s)
        .collect();
    let ndim = real.first().map_or(1, |s| s.len());
    let d = normalize_dim(dim, ndim)?;
    for s in &real {
        let fits = s.len() == ndim && (0..ndim).all(|e| e == d || s[e] == real[0][e]);
        if !fits {
            return Err(rejected(
                format!("cat({dim})"),
                s,
                &placements[0],
                format!(
                    "sizes of tensors must match except in dimension {d}: {:?} vs {:?}",
                    real[0], s
                ),
            ));
        }
    }
    let mut rules: Vec<Vec<Slot>> = (0..ndim)
        .filter(|&e| e != d)
        .map(|e| {
            let mut r = vec![Slot::Shard(e)];
            r.extend(legacy.iter().map(|&l| {
                if l {
                    Slot::Fixed(Placement::Replicate)
                } else {
                    Slot::Shard(e)
                }
            }));
            r
        })
        .collect();
    for op in PASS_THROUGH {
        let mut r = vec![Slot::Fixed(Placement::Partial(op))];
        r.extend(legacy.iter().map(|&l| {
            Slot::Fixed(if l {
                Placement::Replicate
            } else {
                Placement::Partial(op)
            })
        }));
        rules.push(r);
    }
    let inputs: Vec<(&[usize], &[Placement])> = shapes
        .iter()
        .zip(placements)
        .map(|(s, p)| (s.as_slice(), p.as_slice()))
        .collect();
    search(mesh, &inputs, rules, 1, false, model)
}

/// `torch.split(x, sizes, dim)` (`aten.split.Tensor` / `aten.split_with_sizes`): the strategy
/// PyTorch picks; [`StrategyChoice::outputs`] has one list per chunk (all equal).
///
/// Rule (`split_single_dim_strategy`, `_ops/_tensor_ops.py`): shards of dims other than `dim` and
/// `P(sum|avg|min|max)` pass through to every chunk; a shard of `dim` is replicated by the search.
/// Not `allow_uneven_sharding` (see [`cat_strategy`]). Errors: placements that do not fit, `dim`
/// out of range, a split size of 0, sections that do not sum to the dim, and an integer split
/// of an empty dim (PyTorch's rule counts no chunk there and fails).
pub fn split_strategy(
    shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    dim: i64,
    sizes: &SplitSizes,
    model: &CostModel,
) -> Result<StrategyChoice> {
    check_input(mesh, shape, placements)?;
    let d = normalize_dim(dim, shape.len())?;
    let n = shape[d];
    let bad = |reason: String| {
        Err(rejected(
            format!("split({sizes:?}, {dim})"),
            shape,
            placements,
            reason,
        ))
    };
    let chunks = match sizes {
        SplitSizes::Size(0) => return bad("split size must be positive".to_string()),
        SplitSizes::Size(s) => n / s + usize::from(n % s != 0),
        SplitSizes::Sections(v) => {
            if v.iter().sum::<usize>() != n {
                return bad(format!(
                    "split sizes {v:?} do not sum to the dimension size {n}"
                ));
            }
            v.len()
        }
    };
    if chunks == 0 {
        return bad("no chunk: PyTorch's split rule counts none for an empty dim".to_string());
    }
    let mut rules: Vec<Vec<Slot>> = (0..shape.len())
        .filter(|&e| e != d)
        .map(|e| vec![Slot::Shard(e); chunks + 1])
        .collect();
    rules.extend(partial_rules(chunks + 1));
    search(mesh, &[(shape, placements)], rules, chunks, false, model)
}

fn mesh_of(mesh_shape: &[usize]) -> Result<DeviceMesh> {
    DeviceMesh::new(mesh_shape.to_vec())
}

fn single(c: StrategyChoice) -> Vec<Placement> {
    c.outputs.into_iter().next().unwrap_or_default()
}

/// Output placements of `x.narrow(dim, start, length)` on a CPU mesh of `mesh_shape` (float32):
/// [`narrow_strategy`] with [`CostModel::default`]. Source: `slice_single_dim_strategy`,
/// `_ops/_tensor_ops.py`.
pub fn narrow_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    dim: i64,
    start: i64,
    length: i64,
) -> Result<Vec<Placement>> {
    let mesh = mesh_of(mesh_shape)?;
    narrow_strategy(
        shape,
        &mesh,
        placements,
        dim,
        start,
        length,
        &CostModel::default(),
    )
    .map(single)
}

/// Output placements of `x.select(dim, index)`: [`select_strategy`] with
/// [`CostModel::default`]. Source: `select_int_single_dim_strategy`, `_ops/_tensor_ops.py`.
pub fn select_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    dim: i64,
    index: i64,
) -> Result<Vec<Placement>> {
    let mesh = mesh_of(mesh_shape)?;
    select_strategy(shape, &mesh, placements, dim, index, &CostModel::default()).map(single)
}

/// Output placements of `torch.cat([x] * copies, dim)` (copies of one DTensor): [`cat_strategy`]
/// with [`CostModel::default`]. Source: `cat_single_dim_strategy`, `_ops/_tensor_ops.py`.
pub fn cat_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    dim: i64,
    copies: usize,
) -> Result<Vec<Placement>> {
    let mesh = mesh_of(mesh_shape)?;
    cat_strategy(
        &vec![shape.to_vec(); copies],
        &mesh,
        &vec![placements.to_vec(); copies],
        dim,
        &CostModel::default(),
    )
    .map(single)
}

/// Output placements of every chunk of `torch.split(x, sizes, dim)`: [`split_strategy`] with
/// [`CostModel::default`]. Source: `split_single_dim_strategy`, `_ops/_tensor_ops.py`.
pub fn split_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    dim: i64,
    sizes: &SplitSizes,
) -> Result<Vec<Vec<Placement>>> {
    let mesh = mesh_of(mesh_shape)?;
    split_strategy(shape, &mesh, placements, dim, sizes, &CostModel::default()).map(|c| c.outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn p(s: &str) -> Vec<Placement> {
        parse_placements(s).unwrap()
    }

    fn f(r: Result<Vec<Placement>>) -> String {
        r.map(|q| format_placements(&q))
            .unwrap_or_else(|_| "error".into())
    }

    /// Answers PyTorch 2.15 gave (DTensor ops on a fake process group, CPU mesh, float32).
    #[test]
    fn pytorch_probe_table() {
        // select of a dim sharded twice: both mesh dims replicate.
        assert_eq!(
            f(select_placements(
                &[8, 8],
                &[2, 2],
                &p("[S(0), S(0)]"),
                0,
                1
            )),
            "[R, R]"
        );
        // narrow of dim 0: S(0) replicated, S(1) kept.
        assert_eq!(
            f(narrow_placements(
                &[8, 8],
                &[2, 2],
                &p("[S(0), S(1)]"),
                0,
                1,
                3
            )),
            "[R, S(1)]"
        );
        // Partial passes through; the sliced S(1) is replicated.
        assert_eq!(
            f(narrow_placements(
                &[8, 8],
                &[2, 2],
                &p("[P(sum), S(1)]"),
                1,
                1,
                3
            )),
            "[P(sum), R]"
        );
        assert_eq!(
            f(cat_placements(&[8, 8], &[2, 2], &p("[S(0), S(1)]"), 0, 2)),
            "[R, S(1)]"
        );
        // Legacy empty tensors: the last zero-cost rule is P(max).
        assert_eq!(
            f(cat_placements(&[0], &[2, 2], &p("[R, R]"), 0, 2)),
            "[P(max), P(max)]"
        );
        let s = split_placements(
            &[8, 8],
            &[2, 2],
            &p("[S(0), S(1)]"),
            0,
            &SplitSizes::Size(3),
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|q| format_placements(q) == "[R, S(1)]"));
    }

    /// From PyTorch's `test/distributed/tensor/test_tensor_ops.py` (world size 4, 1-D mesh).
    #[test]
    fn pytorch_test_tensor_ops() {
        let mesh = DeviceMesh::new(vec![4]).unwrap();
        let m = CostModel::default();
        // test_slice: [8, 16] with S(1), x[:, 8:] -> one collective (an all-gather to R).
        let c = slice_strategy(&[8, 16], &mesh, &p("[S(1)]"), 1, Some(8), None, 1, &m).unwrap();
        assert_eq!(
            (c.outputs, c.inputs, c.redistributed),
            (vec![p("[R]")], vec![p("[R]")], true)
        );
        // test_slice_full_size_on_sharded_dim: [2, 4] with S(1): a full or past-the-end slice of
        // the sharded dim, or a full slice of dim 0, keeps S(1) with no communication.
        for (dim, end) in [(1, 4), (1, 8), (0, 2)] {
            let c =
                slice_strategy(&[2, 4], &mesh, &p("[S(1)]"), dim, None, Some(end), 1, &m).unwrap();
            assert_eq!(
                (c.outputs, c.redistributed),
                (vec![p("[S(1)]")], false),
                "dim {dim} end {end}"
            );
        }
        // x[:, :2] of the sharded dim: replicated first.
        let c = slice_strategy(&[2, 4], &mesh, &p("[S(1)]"), 1, None, Some(2), 1, &m).unwrap();
        assert_eq!(c.outputs, vec![p("[R]")]);
        // test_split_on_partial: [8, 8], Partial(op), split sizes 2, 3, 4 on dims 0, 1: sum, avg,
        // min, max pass through every chunk; product is all-reduced first.
        for op in ["sum", "avg", "min", "max", "product"] {
            for size in [2, 3, 4] {
                for dim in [0, 1] {
                    let q = p(&format!("[P({op})]"));
                    let out =
                        split_placements(&[8, 8], &[4], &q, dim, &SplitSizes::Size(size)).unwrap();
                    assert_eq!(out.len(), 8usize.div_ceil(size));
                    let want = if op == "product" { p("[R]") } else { q.clone() };
                    assert!(out.iter().all(|o| *o == want), "{op} {size} {dim}");
                }
            }
        }
    }

    #[test]
    fn whole_slice_keeps_the_shard() {
        // slice_single_dim_strategy: a statically full slice is a view and keeps S(dim).
        assert_eq!(
            f(narrow_placements(&[8, 4], &[4], &p("[S(0)]"), 0, 0, 8)),
            "[S(0)]"
        );
        assert_eq!(
            f(narrow_placements(&[8, 4], &[4], &p("[S(0)]"), 0, 0, 7)),
            "[R]"
        );
        // another dim's shard passes through
        assert_eq!(
            f(narrow_placements(&[8, 4], &[4], &p("[S(0)]"), 1, 1, 2)),
            "[S(0)]"
        );
    }

    #[test]
    fn select_moves_later_dims_down() {
        assert_eq!(
            f(select_placements(
                &[4, 6, 8],
                &[2, 2],
                &p("[S(2), S(0)]"),
                1,
                0
            )),
            "[S(1), S(0)]"
        );
        assert_eq!(
            f(select_placements(&[4, 6, 8], &[2], &p("[P(avg)]"), -1, 3)),
            "[P(avg)]"
        );
    }

    #[test]
    fn argument_errors() {
        assert!(select_placements(&[4, 6], &[2], &p("[S(0)]"), 1, 6).is_err());
        assert!(narrow_placements(&[4, 6], &[2], &p("[S(0)]"), 1, 4, 3).is_err());
        assert!(split_placements(
            &[4, 6],
            &[2],
            &p("[S(0)]"),
            1,
            &SplitSizes::Sections(vec![2, 3])
        )
        .is_err());
        assert!(cat_placements(&[4, 6], &[2], &p("[S(0)]"), 2, 2).is_err());
    }

    #[test]
    fn cost_model_pieces() {
        // CPU mesh (1 device per host): every mesh dim with more than one device is inter-host.
        let t = mesh_topo(&[2, 1], &CostModel::default());
        assert_eq!(t[0], (87.7 * 0.22, 2.7));
        assert_eq!(t[1], (87.7, 0.6));
        // S -> R on 4 ranks of a tiny tensor: latency 6.6 + 3 hops.
        let (c, _) = transition_cost(
            Placement::Shard(0),
            Placement::Replicate,
            4,
            (87.7, 0.6),
            0.0,
        );
        assert!((c - (6.6 + 3.0 * 0.6)).abs() < 1e-12);
        assert_eq!(
            redistribute_cost(&[8], &[2], &p("[R]"), &p("[S(0)]"), &CostModel::default()),
            0.0
        );
        assert_eq!(
            redistribute_cost(
                &[8],
                &[2],
                &p("[_S(0, 2)]"),
                &p("[R]"),
                &CostModel::default()
            ),
            f64::INFINITY
        );
    }
}
