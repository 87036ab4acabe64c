//! Placement propagation of `Tensor.view` (strict view rules): which output placements a view
//! of a DTensor gets, or the refusal PyTorch raises.
//!
//! Source: `torch/distributed/tensor/_ops/_view_ops.py` (torch 2.15): `view_groups` decomposes
//! the reshape into kept / flattened / split dims, `_ViewShardingPropagator` (strict mode, as
//! registered for `aten.view.default`) decides each placement. Ported rule by rule, including
//! the order of its side effects. Examples: `[6, 4] -> [24]` with `S(1)` on mesh `[2]` gives
//! `_S(0, 6)`; `[12, 6] -> [72]` with `S(1)` on `[4]` gives `_S(0, 12)` (uneven inner flatten
//! allowed); `[6] -> [2, 3]` with `S(0)` on `[4]` is refused (2 % 4 != 0).
//!
//! Where PyTorch's rule crashes (a bare `KeyError` / `AssertionError` for some flattens of a `_S`
//! on a non-leading dim), this crate returns [`PlacementError::ViewRejected`] too.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{PlacementError, Result};
use crate::placement::{format_placements, Placement};

/// What one output dim of a view is made of (`DimSpec` of `_view_ops.py`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum DimSpec {
    /// A size-1 output dim with no input.
    Singleton,
    /// Input dim kept as is.
    Input(usize),
    /// Input dims flattened together (always plain input dims here).
    Flatten(Vec<usize>),
    /// Member `split_id` of a split of `input` into `group_shape`.
    Split {
        input: Box<DimSpec>,
        group_shape: Vec<usize>,
        split_id: usize,
    },
}

fn flatten_new(dims: Vec<usize>) -> DimSpec {
    match dims.len() {
        0 => DimSpec::Singleton,
        1 => DimSpec::Input(dims[0]),
        _ => DimSpec::Flatten(dims),
    }
}

fn split_new(dim: DimSpec, group_shape: &[usize], idx: usize) -> DimSpec {
    if group_shape.len() == 1 {
        return dim;
    }
    if group_shape[idx] == 1 {
        return DimSpec::Singleton;
    }
    let kept: Vec<(usize, usize)> = group_shape
        .iter()
        .enumerate()
        .filter(|(_, &s)| s != 1)
        .map(|(i, &s)| (s, i))
        .collect();
    let new_idx = kept.iter().position(|&(_, i)| i == idx).unwrap_or(0);
    DimSpec::Split {
        input: Box::new(dim),
        group_shape: kept.iter().map(|&(s, _)| s).collect(),
        split_id: new_idx,
    }
}

/// `infer_size`: resolves one `-1` in `sizes` for `total` elements.
fn infer_size(
    total: usize,
    sizes: &[i64],
    err: &dyn Fn(String) -> PlacementError,
) -> Result<Vec<usize>> {
    let infers: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] == -1).collect();
    if infers.len() > 1 {
        return Err(err("only one dimension can be inferred (-1)".to_string()));
    }
    if let Some(&bad) = sizes.iter().find(|&&s| s < -1) {
        return Err(err(format!("invalid size {bad}")));
    }
    let known: usize = sizes
        .iter()
        .filter(|&&s| s != -1)
        .try_fold(1usize, |a, &s| a.checked_mul(usize::try_from(s).ok()?))
        .ok_or_else(|| err(format!("element count of sizes {sizes:?} overflows")))?;
    let mut out: Vec<usize> = sizes.iter().map(|&s| s.max(0) as usize).collect();
    if let Some(&i) = infers.first() {
        if known == 0 || total % known != 0 {
            return Err(err(format!(
                "size inferred for -1 is not integral: {sizes:?} should have {total} elements"
            )));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(err(format!("sizes do not match: {total} vs {known}")));
    }
    Ok(out)
}

/// `view_groups(from_size, to_size)` of `_view_ops.py` for concrete sizes. `None` where that
/// loop makes no progress: a 0-element tensor whose sizes leave an input dim > 1 after the last
/// output dim, or an output dim > 1 after the last input dim (`[0, 2] -> [0]`, `[0] -> [0, 2]`;
/// the Python loop backtracks forever there).
fn view_groups(from: &[usize], to: &[usize]) -> Option<Vec<DimSpec>> {
    let (from_len, to_len) = (from.len(), to.len());
    let (mut fi, mut ti) = (0usize, 0usize);
    let mut result = Vec::new();
    while fi < from_len || ti < to_len {
        let mut from_group: Vec<usize> = Vec::new();
        let mut to_group: Vec<usize> = Vec::new();
        let mut f = if fi >= from_len {
            1
        } else {
            from_group.push(fi);
            fi += 1;
            from[fi - 1]
        };
        let mut t = if ti >= to_len {
            1
        } else {
            to_group.push(to[ti]);
            ti += 1;
            to[ti - 1]
        };
        if f == 1 && t != 1 {
            // Backtrack the output dim; progress only when an input dim of size 1 was consumed.
            from_group.first()?;
            ti -= 1;
            to_group.clear();
        } else if f != 1 && t == 1 {
            to_group.first()?;
            fi -= 1;
            from_group.clear();
        } else {
            while f != t {
                // Grow the side with the smaller product, the input first (`_view_ops.py`: `f <
                // t` grows the input); a 0 output is reached through the input dims, a 0 input
                // through the output dims once the input is used up.
                if t == 0 || t > f {
                    if let Some(&n) = from.get(fi) {
                        from_group.push(fi);
                        f = f.saturating_mul(n);
                        fi += 1;
                        continue;
                    }
                }
                let Some(&n) = to.get(ti) else { break };
                to_group.push(n);
                t = t.saturating_mul(n);
                ti += 1;
            }
        }
        if !to_group.is_empty() {
            let flattened = flatten_new(from_group.into_iter().filter(|&d| from[d] >= 1).collect());
            for i in 0..to_group.len() {
                result.push(split_new(flattened.clone(), &to_group, i));
            }
        }
    }
    Some(result)
}

/// Phase 1 result: input placements after demotion, and input dim -> output dims.
type Analysis = (Vec<Placement>, BTreeMap<usize, Vec<usize>>);

/// The view propagator (`_ViewShardingPropagator`): strict (`strict_view=True`, `Tensor.view`)
/// refuses what needs a redistribution; non-strict (`aten.reshape` / `aten.view_copy`) demotes
/// the mesh dims concerned to `Replicate` instead.
struct Propagator<'a> {
    strict: bool,
    src: &'a [Placement],
    global: &'a [usize],
    rule: &'a [DimSpec],
    mesh: &'a [usize],
    shard_allowed: BTreeMap<usize, Vec<bool>>,
    matched_strided: BTreeSet<usize>,
    fallback: BTreeSet<(usize, usize)>,
}

fn plain_dim(p: &Placement) -> Option<usize> {
    match p {
        Placement::Shard(d) => Some(*d),
        _ => None,
    }
}

impl Propagator<'_> {
    fn find_plain_shard(&self, dim: usize) -> Option<usize> {
        self.src.iter().position(|p| plain_dim(p) == Some(dim))
    }

    fn expected_split_factor(
        &self,
        group_shape: &[usize],
        split_id: usize,
        dim: usize,
        mesh_dim: usize,
        placements: &[Placement],
    ) -> Option<usize> {
        let mut sf: usize = group_shape[..split_id].iter().product();
        for (m, p) in placements.iter().enumerate().take(mesh_dim) {
            if p.shard_dim() == Some(dim) {
                if sf % self.mesh[m] != 0 {
                    return None;
                }
                sf /= self.mesh[m];
            }
        }
        Some(sf)
    }

    fn analyze_dim(&mut self, cmd: &DimSpec) -> std::result::Result<Vec<usize>, String> {
        match cmd {
            DimSpec::Input(d) => Ok(vec![*d]),
            DimSpec::Flatten(dims) => self.analyze_flatten(dims),
            DimSpec::Split {
                input,
                group_shape,
                split_id,
            } => self.analyze_split(input, group_shape, *split_id),
            DimSpec::Singleton => Ok(vec![]),
        }
    }

    fn analyze_flatten(&mut self, dims: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let mut sharded = Vec::new();
        for (i, &dim) in dims.iter().enumerate() {
            let Some(m) = self.find_plain_shard(dim) else {
                continue;
            };
            let (n, k) = (self.global[dim], self.mesh[m]);
            let allowed = if self.strict {
                if i != dims.len() - 1 && n % k != 0 {
                    return Err(format!(
                        "cannot flatten unevenly sharded tensor: dimension {dim} (size {n}) is not evenly divisible by mesh dimension {m} (size {k})"
                    ));
                }
                sharded.push(dim);
                true
            } else if i == 0 {
                // Non-strict keeps a shard of the first flattened dim when it is even, and
                // replicates a shard of any later one (torch 2.15 has no rewrite for it yet).
                sharded.push(dim);
                n % k == 0
            } else {
                false
            };
            self.shard_allowed
                .insert(dim, vec![allowed; self.mesh.len()]);
        }
        if sharded.is_empty() {
            Ok(vec![dims[0]])
        } else {
            Ok(sharded)
        }
    }

    fn analyze_split(
        &mut self,
        input: &DimSpec,
        group_shape: &[usize],
        split_id: usize,
    ) -> std::result::Result<Vec<usize>, String> {
        let in_dims = self.analyze_dim(input)?;
        let Some(&in_dim) = in_dims.first() else {
            return Ok(vec![]);
        };
        if let DimSpec::Flatten(flat) = input {
            for &fd in &flat[1..] {
                for (m, p) in self.src.iter().enumerate() {
                    if plain_dim(p) == Some(fd) {
                        if let Some(a) = self.shard_allowed.get_mut(&fd) {
                            a[m] = false;
                        }
                        self.fallback.insert((fd, m));
                    }
                }
            }
        }
        let out_size = group_shape[split_id];
        // _find_shard_for_split
        let mut found: Option<(usize, Placement)> = None;
        for (m, p) in self.src.iter().enumerate() {
            if p.shard_dim() != Some(in_dim) || self.matched_strided.contains(&m) {
                continue;
            }
            match p {
                Placement::StridedShard { split_factor, .. } => {
                    let e = self.expected_split_factor(group_shape, split_id, in_dim, m, self.src);
                    if e == Some(*split_factor) {
                        found = Some((m, *p));
                        break;
                    }
                }
                _ => {
                    found = Some((m, *p));
                    break;
                }
            }
        }
        if split_id == 0 {
            let allowed: Vec<bool> = self.mesh.iter().map(|&k| out_size % k == 0).collect();
            self.shard_allowed.insert(in_dim, allowed);
            if let Some(pm) = self.find_plain_shard(in_dim).filter(|_| self.strict) {
                if !self.shard_allowed[&in_dim][pm] {
                    return Err(format!(
                        "cannot unflatten unevenly sharded tensor: output dimension {split_id} (size {out_size}) is not evenly divisible by mesh dimension {pm} (size {})",
                        self.mesh[pm]
                    ));
                }
            }
        }
        if let Some((m, Placement::StridedShard { .. })) = found {
            let is_last = split_id == group_shape.len() - 1;
            if self.strict && !is_last && out_size % self.mesh[m] != 0 {
                return Err(format!(
                    "cannot unflatten unevenly sharded tensor: output dimension {split_id} (size {out_size}) is not evenly divisible by mesh dimension {m} (size {})",
                    self.mesh[m]
                ));
            }
            self.matched_strided.insert(m);
            if let Some(a) = self.shard_allowed.get_mut(&in_dim) {
                a[m] = out_size % self.mesh[m] == 0 || is_last;
            }
        }
        Ok(if split_id == 0 { vec![in_dim] } else { vec![] })
    }

    fn analyze(&mut self) -> std::result::Result<Analysis, String> {
        let mut in_rule = BTreeSet::new();
        fn walk(cmd: &DimSpec, seen: &mut BTreeSet<usize>) {
            match cmd {
                DimSpec::Input(d) => {
                    seen.insert(*d);
                }
                DimSpec::Flatten(ds) => seen.extend(ds.iter().copied()),
                DimSpec::Split { input, .. } => walk(input, seen),
                DimSpec::Singleton => {}
            }
        }
        for cmd in self.rule {
            walk(cmd, &mut in_rule);
        }
        for d in 0..self.global.len() {
            self.shard_allowed
                .insert(d, vec![in_rule.contains(&d); self.mesh.len()]);
        }
        let mut map: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (out_dim, cmd) in self.rule.iter().enumerate() {
            let in_dims = self.analyze_dim(cmd)?;
            match cmd {
                DimSpec::Flatten(_) => {
                    for d in in_dims {
                        if map.contains_key(&d) {
                            return Err(format!(
                                "input dim {d} already mapped (PyTorch AssertionError)"
                            ));
                        }
                        map.insert(d, vec![out_dim]);
                    }
                }
                _ if !in_dims.is_empty() => map.entry(in_dims[0]).or_default().push(out_dim),
                DimSpec::Split { input, .. } => {
                    let mut root: &DimSpec = input;
                    loop {
                        match root {
                            DimSpec::Flatten(ds) => {
                                // Flatten holds plain input dims: its first one is the root.
                                if let Some(v) = map.get_mut(&ds[0]) {
                                    v.push(out_dim);
                                }
                                break;
                            }
                            DimSpec::Split { input, .. } => root = input,
                            DimSpec::Input(d) => {
                                if let Some(v) = map.get_mut(d) {
                                    v.push(out_dim);
                                }
                                break;
                            }
                            DimSpec::Singleton => break,
                        }
                    }
                }
                _ => {}
            }
        }
        let mut tgt = Vec::with_capacity(self.src.len());
        for (m, p) in self.src.iter().enumerate() {
            match p.shard_dim() {
                Some(d) if !self.shard_allowed[&d][m] => {
                    if self.strict && !self.fallback.contains(&(d, m)) {
                        return Err(format!(
                            "this operation would remove or reshape sharded dimension {d}, which requires redistribution"
                        ));
                    }
                    tgt.push(Placement::Replicate);
                }
                _ => tgt.push(*p),
            }
        }
        Ok((tgt, map))
    }

    fn rewrite(
        &self,
        tgt: &[Placement],
        map: &BTreeMap<usize, Vec<usize>>,
    ) -> std::result::Result<Vec<Placement>, String> {
        let mut claimed: BTreeSet<(usize, usize)> = BTreeSet::new();
        // Local sizes after the mesh dims so far, read only for the dims of a Flatten output
        // (the split factor and evenness of a later shard of that group), so only the shards
        // whose output is a Flatten update them (torch's `local_tensor_shapes` also divides the
        // others; nothing reads those).
        let mut local: Vec<usize> = self.global.to_vec();
        let mut out = Vec::with_capacity(tgt.len());
        for (m, p) in tgt.iter().enumerate() {
            let Some(d) = p.shard_dim() else {
                out.push(*p);
                continue;
            };
            let dims: Vec<usize> = map
                .get(&d)
                .ok_or_else(|| format!("input dim {d} has no output dim (PyTorch KeyError)"))?
                .iter()
                .copied()
                .filter(|&o| !claimed.contains(&(d, o)))
                .collect();
            let k = self.mesh[m];
            match p {
                Placement::Shard(_) => {
                    // One unclaimed output dim, else the first split of the group (none left:
                    // refused, as PyTorch's assertion).
                    let o = match dims.as_slice() {
                        [o] => *o,
                        _ => *dims
                            .iter()
                            .find(|&&o| matches!(self.rule[o], DimSpec::Split { split_id: 0, .. }))
                            .ok_or_else(|| {
                                format!("no unclaimed output dim (one, or a Split(split_id=0)) for S({d}) (PyTorch AssertionError)")
                            })?,
                    };
                    match &self.rule[o] {
                        DimSpec::Split { input, .. } => {
                            if let DimSpec::Flatten(fl) = input.as_ref() {
                                if fl[0] != d {
                                    return Err(format!(
                                        "S({d}) should have been demoted (PyTorch AssertionError)"
                                    ));
                                }
                            }
                            out.push(Placement::Shard(o));
                        }
                        DimSpec::Input(_) => out.push(Placement::Shard(o)),
                        DimSpec::Flatten(fl) => {
                            let (first, last) = (fl[0], fl[fl.len() - 1]);
                            let placement = if d == first {
                                Placement::Shard(o)
                            } else {
                                Placement::StridedShard {
                                    dim: o,
                                    split_factor: local[first..d].iter().product(),
                                }
                            };
                            let is_last = !tgt[m + 1..].iter().any(|q| {
                                q.shard_dim()
                                    .is_some_and(|qd| first <= qd && qd <= last && qd >= d)
                            });
                            if local[d] % k != 0 && !is_last {
                                return Err(format!(
                                    "cannot shard unevenly distributed tensor: dimension {d} (size {}) is not evenly divisible by mesh dimension {m} (size {k})",
                                    local[d]
                                ));
                            }
                            local[d] /= k;
                            out.push(placement);
                        }
                        DimSpec::Singleton => {
                            return Err("expected Flatten (PyTorch AssertionError)".to_string())
                        }
                    }
                }
                Placement::StridedShard { split_factor, .. } => {
                    let sf = *split_factor;
                    let mut done = false;
                    for &o in &dims {
                        if let DimSpec::Split {
                            group_shape,
                            split_id,
                            ..
                        } = &self.rule[o]
                        {
                            if self.expected_split_factor(group_shape, *split_id, d, m, tgt)
                                == Some(sf)
                            {
                                claimed.insert((d, o));
                                out.push(Placement::Shard(o));
                                done = true;
                                break;
                            }
                        }
                    }
                    if done {
                        continue;
                    }
                    let keep = self.find_keep_ss_dim(&dims, d, sf, m);
                    let o = match keep {
                        Some(o) => o,
                        None => {
                            if self.strict
                                && dims
                                    .iter()
                                    .any(|&o| matches!(self.rule[o], DimSpec::Split { .. }))
                            {
                                return Err(format!(
                                    "cannot unflatten tensor with _StridedShard placement: split_factor={sf} does not match any output dimension"
                                ));
                            }
                            *dims.first().ok_or_else(|| {
                                format!("no unclaimed output dim for _S({d}, {sf}) (PyTorch AssertionError)")
                            })?
                        }
                    };
                    local[d] /= k;
                    out.push(Placement::StridedShard {
                        dim: o,
                        split_factor: sf,
                    });
                }
                _ => out.push(*p),
            }
        }
        Ok(out)
    }

    fn find_keep_ss_dim(&self, dims: &[usize], d: usize, sf: usize, m: usize) -> Option<usize> {
        let total = self.mesh[m] * sf;
        let n = self.global[d];
        if total == 0 || n % total != 0 {
            return None;
        }
        let shard_size = n / total;
        for &o in dims {
            if let DimSpec::Split {
                input,
                group_shape,
                split_id,
            } = &self.rule[o]
            {
                let inner: usize = group_shape[split_id + 1..].iter().product();
                let mut trailing = 1;
                if let DimSpec::Flatten(fl) = input.as_ref() {
                    let mut found = false;
                    for &fd in fl {
                        if fd == d {
                            found = true;
                        } else if found {
                            trailing *= self.global[fd];
                        }
                    }
                }
                let fss = shard_size * trailing;
                if inner != 0 && fss >= inner && fss % inner == 0 {
                    return Some(o);
                }
            }
        }
        None
    }
}

/// Output placements of `x.view(*sizes)` for a DTensor of `global_shape` with `placements` on a
/// mesh of `mesh_shape` (one `-1` allowed in `sizes`), by PyTorch's strict view rule
/// (`propagate_shape_and_sharding(..., strict_view=True)`, the rule of `aten.view.default`).
///
/// Errors ([`PlacementError::ViewRejected`]): sizes that do not fit the element count, a view
/// that would reshape a sharded dim unevenly or otherwise need redistribution (PyTorch raises
/// "Please redistribute the tensor before this operation"), and the inputs on which PyTorch's rule
/// crashes; [`PlacementError::PlacementCountMismatch`] / `ShardDimOutOfRange` for bad placements.
pub fn view_placements(
    global_shape: &[usize],
    sizes: &[i64],
    mesh_shape: &[usize],
    placements: &[Placement],
) -> Result<Vec<Placement>> {
    propagate("view", true, global_shape, sizes, mesh_shape, placements).map(|r| r.output)
}

/// What the non-strict view rule does with a reshape: the placements the input is redistributed
/// to first, and the output's placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshapeSharding {
    /// The input's placements after the redistribution the rule asks for: a mesh dim whose shard
    /// the reshape cannot carry becomes `Replicate`; the others are unchanged (equal to the
    /// input's placements when nothing moves).
    pub input: Vec<Placement>,
    /// The output's placements, on the same mesh.
    pub output: Vec<Placement>,
}

/// `x.reshape(*sizes)` by PyTorch's non-strict view rule
/// (`propagate_shape_and_sharding(..., strict_view=False)` in torch 2.15's `_ops/_view_ops.py`,
/// the rule registered for `aten.reshape.default` and `aten.view_copy.default`): where the strict
/// rule refuses (an uneven flatten or unflatten, a shard of a non-first flattened dim, a
/// `_StridedShard` whose split factor fits no output dim), the mesh dim is replicated first.
/// Note: eager `DTensor.reshape` decomposes to `aten.view` (the strict rule) in torch 2.15.
///
/// Errors as [`view_placements`], except the refusals that a redistribution resolves; PyTorch
/// still refuses an uneven shard of a flattened dim that is not the group's last shard.
pub fn reshape_placements(
    global_shape: &[usize],
    sizes: &[i64],
    mesh_shape: &[usize],
    placements: &[Placement],
) -> Result<ReshapeSharding> {
    propagate(
        "reshape",
        false,
        global_shape,
        sizes,
        mesh_shape,
        placements,
    )
}

fn propagate(
    op: &str,
    strict: bool,
    global_shape: &[usize],
    sizes: &[i64],
    mesh_shape: &[usize],
    placements: &[Placement],
) -> Result<ReshapeSharding> {
    let mesh = crate::mesh::DeviceMesh::new(mesh_shape.to_vec())?;
    crate::local::check_placements(&mesh, placements, global_shape.len())?;
    let err = |reason: String| PlacementError::ViewRejected {
        op: format!("{op}({global_shape:?} -> {sizes:?})"),
        shape: global_shape.to_vec(),
        placements: format_placements(placements),
        reason,
    };
    let total = global_shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| PlacementError::Overflow {
            what: format!("element count of {global_shape:?}"),
        })?;
    let to = infer_size(total, sizes, &err)?;
    let rule = view_groups(global_shape, &to).ok_or_else(|| {
        err(format!(
            "the dims of a 0-element tensor cannot be grouped with the sizes {to:?}"
        ))
    })?;
    let mut prop = Propagator {
        strict,
        src: placements,
        global: global_shape,
        rule: &rule,
        mesh: mesh_shape,
        shard_allowed: BTreeMap::new(),
        matched_strided: BTreeSet::new(),
        fallback: BTreeSet::new(),
    };
    let (tgt, map) = prop.analyze().map_err(err)?;
    let output = prop.rewrite(&tgt, &map).map_err(err)?;
    Ok(ReshapeSharding { input: tgt, output })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn v(g: &[usize], sizes: &[i64], mesh: &[usize], p: &str) -> Result<String> {
        view_placements(g, sizes, mesh, &parse_placements(p).unwrap())
            .map(|q| format_placements(&q))
    }

    #[test]
    fn placement_md_examples() {
        assert_eq!(v(&[6, 4], &[24], &[2], "[S(1)]").unwrap(), "[_S(0, 6)]");
        assert_eq!(v(&[12, 6], &[72], &[4], "[S(1)]").unwrap(), "[_S(0, 12)]");
        assert_eq!(v(&[6, 4], &[24], &[2], "[S(0)]").unwrap(), "[S(0)]");
        // Unflatten: S(d) -> S(first output dim) iff g0 % mesh == 0.
        assert_eq!(v(&[6], &[2, 3], &[2], "[S(0)]").unwrap(), "[S(0)]");
        assert!(v(&[6], &[2, 3], &[4], "[S(0)]").is_err());
        // _S from a flatten unflattens back to S.
        assert_eq!(v(&[24], &[6, 4], &[2], "[_S(0, 6)]").unwrap(), "[S(1)]");
        assert_eq!(v(&[2, 3, 4], &[2, -1], &[2], "[R]").unwrap(), "[R]");
        assert!(v(&[2, 3], &[7], &[2], "[R]").is_err());
    }

    fn r(g: &[usize], sizes: &[i64], mesh: &[usize], p: &str) -> (String, String) {
        let s = reshape_placements(g, sizes, mesh, &parse_placements(p).unwrap()).unwrap();
        (format_placements(&s.input), format_placements(&s.output))
    }

    #[test]
    fn reshape_replicates_where_view_refuses() {
        // torch 2.15 on a fake 4-rank CPU mesh, aten.view_copy (the non-strict rule): an uneven
        // unflatten and a flatten of a non-first sharded dim all-gather first.
        assert!(v(&[6], &[2, 3], &[4], "[S(0)]").is_err());
        assert_eq!(
            r(&[6], &[2, 3], &[4], "[S(0)]"),
            ("[R]".into(), "[R]".into())
        );
        assert_eq!(v(&[4, 6], &[24], &[4], "[S(1)]").unwrap(), "[_S(0, 4)]");
        assert_eq!(
            r(&[4, 6], &[24], &[4], "[S(1)]"),
            ("[R]".into(), "[R]".into())
        );
        // What the strict rule carries, the non-strict one carries the same way.
        assert_eq!(
            r(&[6, 4], &[24], &[2], "[S(0)]"),
            ("[S(0)]".into(), "[S(0)]".into())
        );
        assert_eq!(
            r(&[24], &[6, 4], &[2], "[_S(0, 6)]"),
            ("[_S(0, 6)]".into(), "[S(1)]".into())
        );
        // An uneven first flattened dim is replicated; the strict rule keeps it only when last.
        assert_eq!(
            r(&[5, 4], &[20], &[2], "[S(0)]"),
            ("[R]".into(), "[R]".into())
        );
    }

    #[test]
    fn view_groups_matches_docstring() {
        assert_eq!(
            view_groups(&[2, 3, 4], &[2, 12]).unwrap(),
            vec![DimSpec::Input(0), DimSpec::Flatten(vec![1, 2])]
        );
        let s = |i| DimSpec::Split {
            input: Box::new(DimSpec::Flatten(vec![0, 1])),
            group_shape: vec![3, 2],
            split_id: i,
        };
        assert_eq!(view_groups(&[2, 3], &[3, 2]).unwrap(), vec![s(0), s(1)]);
        // Size-1 dims on either side: a new output dim is a singleton, an input one is dropped.
        assert_eq!(
            view_groups(&[4], &[4, 1]).unwrap(),
            vec![DimSpec::Input(0), DimSpec::Singleton]
        );
        assert_eq!(view_groups(&[1, 4], &[4]).unwrap(), vec![DimSpec::Input(1)]);
        assert_eq!(
            view_groups(&[4, 1], &[1, 4]).unwrap(),
            vec![DimSpec::Singleton, DimSpec::Input(0)]
        );
    }

    #[test]
    fn sizes_that_fit_no_view_are_refused_and_zero_elements_do_not_hang() {
        let msg = |r: Result<String>| match r {
            Err(PlacementError::ViewRejected { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(msg(v(&[6], &[4, -1], &[2], "[R]")).contains("not integral"));
        // -1 next to a 0 can be any size.
        assert!(msg(v(&[0, 3], &[0, -1], &[1], "[R]")).contains("not integral"));
        assert!(msg(v(&[6], &[-1, -1], &[1], "[R]")).contains("only one dimension"));
        assert!(msg(v(&[6], &[-2, 3], &[1], "[R]")).contains("invalid size -2"));
        assert!(msg(v(&[6], &[4], &[1], "[R]")).contains("sizes do not match: 6 vs 4"));
        // The grouping loop would backtrack forever on these.
        assert!(msg(v(&[0, 2], &[0], &[1], "[R]")).contains("0-element"));
        assert!(msg(v(&[0], &[0, 2], &[1], "[R]")).contains("0-element"));
        assert_eq!(v(&[0, 2], &[0, 2, 1], &[1], "[R]").unwrap(), "[R]");
        // A 0 on one side is grouped with every dim up to the 0 on the other (flattened groups
        // leave out their 0-size input dims, as `_view_ops.py`).
        assert_eq!(view_groups(&[2, 0], &[0]).unwrap(), vec![DimSpec::Input(0)]);
        let split = |input: DimSpec, group_shape: Vec<usize>, i| DimSpec::Split {
            input: Box::new(input),
            group_shape,
            split_id: i,
        };
        assert_eq!(
            view_groups(&[0], &[2, 0]).unwrap(),
            vec![
                split(DimSpec::Singleton, vec![2, 0], 0),
                split(DimSpec::Singleton, vec![2, 0], 1)
            ]
        );
        assert_eq!(
            view_groups(&[0, 2, 3], &[4, 0]).unwrap(),
            vec![
                split(DimSpec::Flatten(vec![1, 2]), vec![4, 0], 0),
                split(DimSpec::Flatten(vec![1, 2]), vec![4, 0], 1)
            ]
        );
        // The smaller product grows: [2, 3] -> [6] grows the input, [6] -> [2, 3] the output.
        assert_eq!(
            view_groups(&[2, 3], &[6]).unwrap(),
            vec![DimSpec::Flatten(vec![0, 1])]
        );
        assert_eq!(
            view_groups(&[6], &[2, 3]).unwrap(),
            vec![
                split(DimSpec::Input(0), vec![2, 3], 0),
                split(DimSpec::Input(0), vec![2, 3], 1)
            ]
        );
    }

    /// `_StridedShard` inputs unflattened where the matched split is not the last output dim:
    /// torch 2.15's `propagate_shape_and_sharding(..., strict_view=True)` on these inputs gave
    /// the placements below, or raised "Cannot unflatten unevenly sharded tensor: output
    /// dimension D ..." / "would remove or reshape sharded dimension" (`ERR`).
    #[test]
    fn strided_unflatten_matches_torch() {
        let cases: [(&[usize], &[i64], &[usize], &str, &str); 12] = [
            (
                &[24],
                &[2, 3, 4],
                &[2],
                "[_S(0, 2)]",
                "ERR output dimension 1 (size 3)",
            ),
            (&[24], &[2, 4, 3], &[2], "[_S(0, 2)]", "[S(1)]"),
            (
                &[48],
                &[2, 6, 4],
                &[4],
                "[_S(0, 2)]",
                "ERR output dimension 1 (size 6)",
            ),
            (&[48], &[2, 8, 3], &[4], "[_S(0, 2)]", "[S(1)]"),
            (
                &[48],
                &[2, 8, 3],
                &[2, 2],
                "[_S(0, 2), S(0)]",
                "[S(1), S(0)]",
            ),
            (
                &[48],
                &[2, 8, 3],
                &[2, 2],
                "[S(0), _S(0, 2)]",
                "[S(0), _S(1, 2)]",
            ),
            (
                &[24],
                &[2, 3, 4],
                &[2, 2],
                "[_S(0, 2), S(0)]",
                "ERR output dimension 1 (size 3)",
            ),
            (
                &[24],
                &[2, 4, 3],
                &[2, 2],
                "[_S(0, 2), S(0)]",
                "[S(1), S(0)]",
            ),
            (
                &[24],
                &[2, 4, 3],
                &[2, 2],
                "[_S(0, 8), S(0)]",
                "[S(2), S(0)]",
            ),
            (
                &[72],
                &[2, 6, 6],
                &[2, 3],
                "[_S(0, 2), S(0)]",
                "ERR output dimension 0 (size 2)",
            ),
            (
                &[72],
                &[2, 6, 6],
                &[3, 2],
                "[_S(0, 2), S(0)]",
                "[S(1), S(0)]",
            ),
            (
                &[72],
                &[2, 6, 6],
                &[2, 3],
                "[S(0), _S(0, 2)]",
                "ERR reshape sharded dimension 0",
            ),
        ];
        for (g, sizes, mesh, p, want) in cases {
            let got = v(g, sizes, mesh, p);
            match want.strip_prefix("ERR ") {
                Some(needle) => match got {
                    Err(PlacementError::ViewRejected { reason, .. }) => {
                        assert!(reason.contains(needle), "{g:?} {sizes:?} {p}: {reason}")
                    }
                    other => panic!("{g:?} {sizes:?} {mesh:?} {p}: {other:?}, torch raises"),
                },
                None => assert_eq!(got.unwrap(), want, "{g:?} {sizes:?} {mesh:?} {p}"),
            }
        }
    }
}
