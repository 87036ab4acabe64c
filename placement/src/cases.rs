//! The case checker: evaluates every case of a `placement-cases/1` JSON file (the document
//! `oracle/generate_cases.py` writes: `format`, `torch_version`, and `cases`, objects with `id`, `kind`
//! and the kind's fields) against this crate and reports pass, fail
//! or excluded per case. Kinds: `local`, `global_from_local`, `view`, `redistribute`,
//! `redistribute_merge`, `fsdp2`.
//!
//! A case carrying an `"excluded": "reason"` field is a documented PyTorch self-disagreement
//! (e.g. uneven `_StridedShard`, PyTorch issue 168134): it is reported as [`CaseOutcome::Excluded`] and
//! kept out of the agreement count, never hidden. An unknown kind or a malformed case is a
//! [`CaseOutcome::Fail`] naming the id.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{PlacementError, Result};
use crate::local::{infer_global_shape, local_shard};
use crate::mesh::DeviceMesh;
use crate::parallel::{fsdp2_sharding, ModelParallel};
use crate::placement::{normalize_dim, Placement};
use crate::redistribute::{merged_steps, plan_redistribute, DeviceType, MergeRules};
use crate::view::{permute_placements, transpose_placements};
use crate::view_more::{
    flatten_placements, squeeze_placements, stack_placements, unflatten_placements,
    unsqueeze_placements,
};
use crate::view_rule::view_placements;

/// Result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    /// This crate gives PyTorch's answer.
    Pass,
    /// It does not (or the case is malformed / of an unknown kind).
    Fail {
        /// PyTorch's answer (JSON text).
        expected: String,
        /// This crate's answer (JSON text or the error).
        got: String,
    },
    /// A documented PyTorch self-disagreement, kept out of the agreement count.
    Excluded {
        /// The case's reason.
        reason: String,
    },
}

/// One case's id, kind and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// The case id.
    pub id: String,
    /// The case kind (`local`, ...; as written in the file).
    pub kind: String,
    /// The outcome.
    pub outcome: CaseOutcome,
}

/// All results of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The file's `torch_version`, when present.
    pub torch_version: Option<String>,
    /// One result per case, in file order.
    pub results: Vec<CaseResult>,
}

impl CaseReport {
    /// `(passed, failed, excluded)`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for r in &self.results {
            match r.outcome {
                CaseOutcome::Pass => c.0 += 1,
                CaseOutcome::Fail { .. } => c.1 += 1,
                CaseOutcome::Excluded { .. } => c.2 += 1,
            }
        }
        c
    }
}

/// Parses `text` (a `placement-cases/1` document) and checks every case.
///
/// Errors ([`PlacementError::Cases`]): the text is not JSON, `format` is not `placement-cases/1`,
/// or `cases` is not a list. Problems inside a case are failures of that case, never errors.
pub fn check_cases_json(text: &str) -> Result<CaseReport> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| PlacementError::Cases(format!("not valid JSON: {e}")))?;
    match doc.get("format").and_then(Value::as_str) {
        Some("placement-cases/1") => {}
        other => {
            return Err(PlacementError::Cases(format!(
                "format is {other:?}, expected \"placement-cases/1\""
            )))
        }
    }
    let cases = doc
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| PlacementError::Cases("`cases` is missing or not a list".to_string()))?;
    let torch_version = doc
        .get("torch_version")
        .and_then(Value::as_str)
        .map(str::to_string);
    let results = cases
        .iter()
        .enumerate()
        .map(|(i, c)| check_case(i, c))
        .collect();
    Ok(CaseReport {
        torch_version,
        results,
    })
}

/// Checks one case value (position `i` names it when it has no id).
pub fn check_case(i: usize, case: &Value) -> CaseResult {
    let id = case
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("<case #{i} without id>"));
    let kind = case
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("<no kind>")
        .to_string();
    if let Some(reason) = case.get("excluded").and_then(Value::as_str) {
        return CaseResult {
            id,
            kind,
            outcome: CaseOutcome::Excluded {
                reason: reason.to_string(),
            },
        };
    }
    let outcome = match kind.as_str() {
        "local" => check_local(case),
        "global_from_local" => check_global_from_local(case),
        "view" => check_view(case),
        "redistribute" => check_redistribute(case),
        "redistribute_merge" => check_redistribute_merge(case),
        "fsdp2" => check_fsdp2(case),
        other => Err(format!("unknown case kind `{other}`")),
    };
    let outcome = match outcome {
        Ok(None) => CaseOutcome::Pass,
        Ok(Some((expected, got))) => CaseOutcome::Fail { expected, got },
        Err(malformed) => CaseOutcome::Fail {
            expected: "a well-formed case".to_string(),
            got: malformed,
        },
    };
    CaseResult { id, kind, outcome }
}

/// `Ok(None)` pass, `Ok(Some((expected, got)))` mismatch, `Err(msg)` malformed case.
type Check = std::result::Result<Option<(String, String)>, String>;

fn field<'a>(case: &'a Value, name: &str) -> std::result::Result<&'a Value, String> {
    case.get(name)
        .ok_or_else(|| format!("missing field `{name}`"))
}

fn usizes(case: &Value, name: &str) -> std::result::Result<Vec<usize>, String> {
    let v = field(case, name)?
        .as_array()
        .ok_or_else(|| format!("`{name}` is not a list"))?;
    v.iter()
        .map(|x| {
            x.as_u64()
                .and_then(|u| usize::try_from(u).ok())
                .ok_or_else(|| format!("`{name}` holds {x}, not a non-negative integer"))
        })
        .collect()
}

fn i64s(case: &Value, name: &str) -> std::result::Result<Vec<i64>, String> {
    let v = field(case, name)?
        .as_array()
        .ok_or_else(|| format!("`{name}` is not a list"))?;
    v.iter()
        .map(|x| {
            x.as_i64()
                .ok_or_else(|| format!("`{name}` holds {x}, not an integer"))
        })
        .collect()
}

fn placements(case: &Value, name: &str) -> std::result::Result<Vec<Placement>, String> {
    let v = field(case, name)?
        .as_array()
        .ok_or_else(|| format!("`{name}` is not a list"))?;
    v.iter()
        .map(|x| {
            x.as_str()
                .ok_or_else(|| format!("`{name}` holds {x}, not a string"))?
                .parse::<Placement>()
                .map_err(|e| format!("`{name}`: {e}"))
        })
        .collect()
}

fn mesh(case: &Value) -> std::result::Result<DeviceMesh, String> {
    DeviceMesh::new(usizes(case, "mesh_shape")?).map_err(|e| format!("`mesh_shape`: {e}"))
}

fn compare(expected: Value, got: Value) -> Check {
    Ok((expected != got).then(|| (expected.to_string(), got.to_string())))
}

/// An FSDP2 `fully_shard` case (torch's own `fully_shard` on one rank of a fake process group):
/// `global_shape`, `fsdp_mesh_shape` (`[dp]`, or `[replicate, dp]` when `hsdp`), `shard_dim`
/// (what `shard_placement_fn` returned, `null` for the default), `tp` (`null`, or the
/// parameter's `mesh_shape` and `placements` before `fully_shard`) and the rank's `coordinate`
/// on the whole mesh; expected: `mesh_shape`, `placements`, `local_shape` and `indices` (the
/// global indices along every dim, `null` for an empty local tensor), or `error: true`.
fn check_fsdp2(case: &Value) -> Check {
    let g = usizes(case, "global_shape")?;
    let fsdp = usizes(case, "fsdp_mesh_shape")?;
    let hsdp = field(case, "hsdp")?
        .as_bool()
        .ok_or("`hsdp` is not a bool")?;
    let (replicate, dp) = match (hsdp, fsdp.as_slice()) {
        (false, [dp]) => (None, *dp),
        (true, [r, dp]) => (Some(*r), *dp),
        _ => {
            return Err(format!(
                "`fsdp_mesh_shape` {fsdp:?} does not fit hsdp = {hsdp}"
            ))
        }
    };
    let shard_dim = match field(case, "shard_dim")? {
        Value::Null => None,
        v => Some(v.as_i64().ok_or("`shard_dim` is not an integer")?),
    };
    let tp = match field(case, "tp")? {
        Value::Null => None,
        t => Some(ModelParallel {
            mesh_shape: usizes(t, "mesh_shape")?,
            placements: placements(t, "placements")?,
        }),
    };
    let coord = usizes(case, "coordinate")?;
    let got = fsdp2_sharding(&g, dp, replicate, shard_dim, tp.as_ref());
    if case.get("error").and_then(Value::as_bool) == Some(true) {
        return Ok(got.ok().map(|s| {
            (
                "an FSDP refusal".to_string(),
                format!("{:?} on {:?}", s.placements, s.mesh_shape),
            )
        }));
    }
    let expected = serde_json::json!({
        "mesh_shape": field(case, "mesh_shape")?,
        "placements": field(case, "placements")?,
        "local_shape": field(case, "local_shape")?,
        "indices": field(case, "indices")?,
    });
    let s = match got {
        Ok(s) => s,
        Err(e) => return Ok(Some((expected.to_string(), format!("error: {e}")))),
    };
    let mesh = DeviceMesh::new(s.mesh_shape.clone()).map_err(|e| e.to_string())?;
    let shard = match local_shard(&g, &mesh, &s.placements, &coord) {
        Ok(shard) => shard,
        Err(e) => return Ok(Some((expected.to_string(), format!("error: {e}")))),
    };
    let indices = if expected["indices"].is_null() {
        Value::Null
    } else {
        serde_json::json!((0..g.len())
            .map(|d| shard.dim_indices(d, g[d]).to_vec())
            .collect::<Vec<_>>())
    };
    let got = serde_json::json!({
        "mesh_shape": s.mesh_shape,
        "placements": s.placements.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "local_shape": shard.local_shape,
        "indices": indices,
    });
    compare(expected, got)
}

fn check_local(case: &Value) -> Check {
    let g = usizes(case, "global_shape")?;
    let mesh = mesh(case)?;
    let p = placements(case, "placements")?;
    let coord = usizes(case, "coordinate")?;
    let expected_indices = field(case, "indices")?
        .as_array()
        .ok_or("`indices` is not a list")?;
    let expected = serde_json::json!({
        "local_shape": field(case, "local_shape")?,
        "global_offset": field(case, "global_offset")?,
        "indices": expected_indices,
    });
    let s = match local_shard(&g, &mesh, &p, &coord) {
        Ok(s) => s,
        Err(e) => return Ok(Some((expected.to_string(), format!("error: {e}")))),
    };
    // `null` means the dim is unsharded: the whole range, in order.
    let got_indices: Vec<Value> = (0..g.len())
        .map(|d| match (&s.indices[d], expected_indices.get(d)) {
            (None, Some(Value::Null)) => Value::Null,
            (Some(set), Some(Value::Null)) if set.to_vec() == (0..g[d]).collect::<Vec<_>>() => {
                Value::Null
            }
            _ => serde_json::json!(s.dim_indices(d, g[d]).to_vec()),
        })
        .collect();
    let got = serde_json::json!({
        "local_shape": s.local_shape,
        "global_offset": s.global_offset,
        "indices": got_indices,
    });
    compare(expected, got)
}

fn check_global_from_local(case: &Value) -> Check {
    let l = usizes(case, "local_shape")?;
    let mesh = mesh(case)?;
    let p = placements(case, "placements")?;
    let expected = field(case, "global_shape")?.clone();
    match infer_global_shape(&l, &mesh, &p) {
        Ok(g) => compare(expected, serde_json::json!(g)),
        Err(e) => Ok(Some((expected.to_string(), format!("error: {e}")))),
    }
}

fn expected_or_error(case: &Value, name: &str) -> std::result::Result<Value, String> {
    if case.get("error").and_then(Value::as_bool) == Some(true) {
        Ok(serde_json::json!({"error": true}))
    } else {
        Ok(field(case, name)?.clone())
    }
}

fn check_view(case: &Value) -> Check {
    let g = usizes(case, "global_shape")?;
    let mesh = mesh(case)?;
    let p = placements(case, "placements")?;
    let op = field(case, "op")?.as_str().ok_or("`op` is not a string")?;
    let args = i64s(case, "args")?;
    let expected = expected_or_error(case, "output_placements")?;
    let ndim = g.len();
    let norm = |d: i64| normalize_dim(d, ndim);
    let got: Result<Vec<Placement>> = match op {
        "transpose" => {
            if args.len() != 2 {
                return Err(format!("transpose takes 2 args, got {args:?}"));
            }
            crate::local::check_placements(&mesh, &p, ndim)
                .and_then(|_| transpose_placements(&p, ndim, norm(args[0])?, norm(args[1])?))
        }
        "permute" => crate::local::check_placements(&mesh, &p, ndim).and_then(|_| {
            let perm = args.iter().map(|&d| norm(d)).collect::<Result<Vec<_>>>()?;
            permute_placements(&p, &perm)
        }),
        "view" => view_placements(&g, &args, mesh.shape(), &p),
        "narrow" | "select" | "cat" | "split" => {
            return check_strategy_op(case, op, &g, &args, &mesh, &p);
        }
        "reshape" => return check_reshape(case, &g, &args, &mesh, &p),
        other => match check_other_op(other, &g, &args, mesh.shape(), &p) {
            Some(r) => r,
            None => return Err(format!("unknown view op `{other}`")),
        },
    };
    let got = match got {
        Ok(q) => serde_json::json!(q.iter().map(|x| x.to_string()).collect::<Vec<_>>()),
        Err(_) => serde_json::json!({"error": true}),
    };
    let got_text = got.to_string();
    match compare(expected, got)? {
        None => Ok(None),
        Some((e, _)) => Ok(Some((e, got_text))),
    }
}

/// `narrow [dim, start, length]`, `select [dim, index]`, `cat [dim]` (of two copies of the input),
/// `split [dim, size]` (`torch.split` with an int) or `split [dim, s0, s1, ..]` (with sizes):
/// `output_placements` is one list, or for `split` one list per chunk; the optional
/// `input_placements_used` (one list per tensor input: what PyTorch redistributed the inputs to)
/// is compared too.
fn check_strategy_op(
    case: &Value,
    op: &str,
    g: &[usize],
    args: &[i64],
    mesh: &DeviceMesh,
    p: &[Placement],
) -> Check {
    use crate::strategy::{
        cat_strategy, narrow_strategy, select_strategy, split_strategy, CostModel, SplitSizes,
    };
    let model = CostModel::default();
    let got = match (op, args) {
        ("narrow", [d, s, l]) => narrow_strategy(g, mesh, p, *d, *s, *l, &model),
        ("select", [d, i]) => select_strategy(g, mesh, p, *d, *i, &model),
        ("cat", [d]) => cat_strategy(
            &[g.to_vec(), g.to_vec()],
            mesh,
            &[p.to_vec(), p.to_vec()],
            *d,
            &model,
        ),
        ("split", [d, rest @ ..]) if !rest.is_empty() => {
            let sizes = rest
                .iter()
                .map(|&s| usize::try_from(s).map_err(|_| format!("split size {s} is negative")))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let sizes = if sizes.len() == 1 {
                SplitSizes::Size(sizes[0])
            } else {
                SplitSizes::Sections(sizes)
            };
            split_strategy(g, mesh, p, *d, &sizes, &model)
        }
        _ => return Err(format!("{op} has the wrong number of arguments: {args:?}")),
    };
    let text = |q: &[Placement]| q.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let with_inputs = case.get("input_placements_used").is_some();
    let mut expected =
        serde_json::json!({"output_placements": expected_or_error(case, "output_placements")?});
    if with_inputs {
        expected["input_placements_used"] = case["input_placements_used"].clone();
    }
    let got = match got {
        Ok(c) => {
            let outs: Value = if op == "split" {
                serde_json::json!(c.outputs.iter().map(|o| text(o)).collect::<Vec<_>>())
            } else {
                serde_json::json!(text(&c.outputs[0]))
            };
            let mut v = serde_json::json!({"output_placements": outs});
            if with_inputs {
                v["input_placements_used"] =
                    serde_json::json!(c.inputs.iter().map(|i| text(i)).collect::<Vec<_>>());
            }
            v
        }
        Err(_) => {
            let mut v = serde_json::json!({"output_placements": {"error": true}});
            if with_inputs {
                v["input_placements_used"] = expected["input_placements_used"].clone();
            }
            v
        }
    };
    compare(expected, got)
}

/// `reshape [sizes..]` by the non-strict view rule: `output_placements`, and
/// `input_placements_used` (one list: the placements the input is redistributed to first).
fn check_reshape(
    case: &Value,
    g: &[usize],
    args: &[i64],
    mesh: &DeviceMesh,
    p: &[Placement],
) -> Check {
    let text = |q: &[Placement]| q.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let expected = if case.get("error").and_then(Value::as_bool) == Some(true) {
        serde_json::json!({"error": true})
    } else {
        serde_json::json!({
            "output_placements": field(case, "output_placements")?,
            "input_placements_used": field(case, "input_placements_used")?,
        })
    };
    let got = match crate::view_rule::reshape_placements(g, args, mesh.shape(), p) {
        Ok(r) => serde_json::json!({
            "output_placements": text(&r.output),
            "input_placements_used": [text(&r.input)],
        }),
        Err(_) => serde_json::json!({"error": true}),
    };
    compare(expected, got)
}

/// The shape ops beyond view, transpose and permute (this crate's oracle also writes them):
/// `unsqueeze [d]`, `squeeze [] | [d..]`, `flatten [start, end]`, `unflatten [d, sizes..]`,
/// and `stack [d]` (of two copies).
/// `None` for an unknown op.
fn check_other_op(
    op: &str,
    g: &[usize],
    args: &[i64],
    mesh: &[usize],
    p: &[Placement],
) -> Option<Result<Vec<Placement>>> {
    let bad = || {
        Err(PlacementError::ViewRejected {
            op: format!("{op}({args:?})"),
            shape: g.to_vec(),
            placements: crate::placement::format_placements(p),
            reason: "wrong number of arguments".to_string(),
        })
    };
    let m = match DeviceMesh::new(mesh.to_vec()) {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    if let Err(e) = crate::local::check_placements(&m, p, g.len()) {
        return Some(Err(e));
    }
    Some(match (op, args) {
        ("unsqueeze", [d]) => unsqueeze_placements(p, g.len(), *d),
        ("squeeze", []) => squeeze_placements(g, p, None),
        ("squeeze", ds) => squeeze_placements(g, p, Some(ds)),
        ("flatten", [s, e]) => flatten_placements(g, mesh, p, *s, *e),
        ("unflatten", [d, sizes @ ..]) if !sizes.is_empty() => {
            unflatten_placements(g, mesh, p, *d, sizes)
        }
        ("stack", [d]) => stack_placements(p, g.len(), *d),
        ("unsqueeze" | "flatten" | "unflatten" | "stack", _) => bad(),
        _ => return None,
    })
}

fn check_redistribute(case: &Value) -> Check {
    let g = usizes(case, "global_shape")?;
    let mesh = mesh(case)?;
    let src = placements(case, "src")?;
    let dst = placements(case, "dst")?;
    // Optional `device_type` (this crate's oracle writes "cpu"): on a plain CPU mesh PyTorch
    // counts an all-to-all as an all-gather (gloo fallback); on CUDA, or on CPU under
    // LocalTensorMode, as `_dtensor.shard_dim_alltoall`. Without the field both are accepted.
    let devices: &[DeviceType] = match case.get("device_type").and_then(Value::as_str) {
        None => &[DeviceType::Cpu, DeviceType::Cuda],
        Some("cpu") => &[DeviceType::Cpu],
        Some("cuda") => &[DeviceType::Cuda],
        Some(other) => return Err(format!("unknown device_type `{other}`")),
    };
    // `execution_error`: PyTorch plans the case but its own execution of the plan raises (the
    // generator records where); the plan (`steps`) is still PyTorch's answer, without counts.
    let plan_only = case
        .get("execution_error")
        .and_then(Value::as_str)
        .is_some();
    let expected = if case.get("error").and_then(Value::as_bool) == Some(true) {
        serde_json::json!({"error": true})
    } else if plan_only {
        serde_json::json!({"steps": field(case, "steps")?})
    } else {
        let steps = field(case, "steps")?;
        let counts = field(case, "comm_counts")?;
        let counts: BTreeMap<String, Value> = counts
            .as_object()
            .ok_or("`comm_counts` is not an object")?
            .iter()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::json!({"steps": steps, "comm_counts": counts})
    };
    let plan = plan_redistribute(&g, &mesh, &src, &dst);
    let mut result = None;
    for &device in devices {
        let got = redistribute_answer(&plan, device);
        let got_text = got.to_string();
        let got_cmp = match got {
            Value::Object(mut m) if m.contains_key("error") => {
                m.remove("message");
                Value::Object(m)
            }
            Value::Object(mut m) if plan_only => {
                m.remove("comm_counts");
                Value::Object(m)
            }
            other => other,
        };
        match compare(expected.clone(), got_cmp)? {
            None => return Ok(None),
            Some((e, _)) => result = result.or(Some((e, got_text))),
        }
    }
    Ok(result)
}

/// A `redistribute_merge` case: the merged steps of PyTorch's plan with every flattened mesh
/// present (`merged`: the mesh dims of each merged step, ascending, as torch's
/// `_FlattenedTransformInfo.original_mesh_dims`) and the collectives CommDebugMode counts when it
/// runs (`comm_counts`, CPU mesh), against [`merged_steps`] under [`MergeRules::PyTorch`].
fn check_redistribute_merge(case: &Value) -> Check {
    let g = usizes(case, "global_shape")?;
    let mesh = mesh(case)?;
    let (src, dst) = (placements(case, "src")?, placements(case, "dst")?);
    let expected = serde_json::json!({
        "merged": field(case, "merged")?,
        "comm_counts": field(case, "comm_counts")?,
    });
    let plan = match plan_redistribute(&g, &mesh, &src, &dst) {
        Ok(plan) => plan,
        Err(e) => return Ok(Some((expected.to_string(), format!("error: {e}")))),
    };
    let steps = merged_steps(&plan, MergeRules::PyTorch);
    let merged: Vec<Vec<usize>> = steps
        .iter()
        .filter(|m| m.merged.len() > 1)
        .map(|m| {
            let mut d = m.mesh_dims.clone();
            d.sort_unstable();
            d
        })
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for name in steps
        .iter()
        .filter_map(|m| m.collective.comm_name_on(DeviceType::Cpu))
    {
        *counts.entry(name).or_insert(0) += 1;
    }
    compare(
        expected,
        serde_json::json!({"merged": merged, "comm_counts": counts}),
    )
}

/// This crate's answer to a `redistribute` case, as JSON: steps and comm counts, or the error.
fn redistribute_answer(
    plan: &Result<crate::redistribute::RedistributePlan>,
    device: DeviceType,
) -> Value {
    match plan {
        Ok(plan) => {
            let steps: Vec<Value> = plan
                .steps
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "mesh_dim": s.mesh_dim,
                        "src": s.src.to_string(),
                        "dst": s.dst.to_string(),
                    })
                })
                .collect();
            serde_json::json!({"steps": steps, "comm_counts": plan.comm_counts_on(device)})
        }
        Err(e) => serde_json::json!({"error": true, "message": e.to_string()}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_cases() {
        let text = r#"{"format": "placement-cases/1", "torch_version": "2.15.0", "cases": [
          {"id": "a", "kind": "local", "global_shape": [5], "mesh_shape": [4], "placements": ["S(0)"],
           "coordinate": [3], "local_shape": [0], "global_offset": [5], "indices": [[]]},
          {"id": "b", "kind": "local", "global_shape": [9, 2], "mesh_shape": [4], "placements": ["_S(0, 2)"],
           "coordinate": [0], "local_shape": [3, 2], "global_offset": [0, 0], "indices": [[0, 1, 5], null]},
          {"id": "c", "kind": "global_from_local", "local_shape": [2, 3], "mesh_shape": [4], "placements": ["S(0)"],
           "global_shape": [8, 3]},
          {"id": "d", "kind": "global_from_local", "local_shape": [2, 3], "mesh_shape": [4], "placements": ["S(0)"],
           "global_shape": [5, 3]},
          {"id": "e", "kind": "view", "op": "transpose", "args": [0, -1], "global_shape": [4, 6],
           "mesh_shape": [2], "placements": ["S(1)"], "output_placements": ["S(0)"]},
          {"id": "f", "kind": "redistribute", "global_shape": [8], "mesh_shape": [2, 2],
           "src": ["S(0)", "S(0)"], "dst": ["R", "S(0)"],
           "steps": [{"mesh_dim": 1, "src": "S(0)", "dst": "R"}, {"mesh_dim": 0, "src": "S(0)", "dst": "R"},
                     {"mesh_dim": 1, "src": "R", "dst": "S(0)"}],
           "comm_counts": {"c10d_functional.all_gather_into_tensor": 2}},
          {"id": "g", "kind": "redistribute", "global_shape": [8], "mesh_shape": [2], "src": ["R"],
           "dst": ["P(sum)"], "error": true},
          {"id": "h", "kind": "nonsense"},
          {"id": "k", "kind": "redistribute", "global_shape": [4, 4], "mesh_shape": [4], "src": ["S(0)"],
           "dst": ["S(1)"], "steps": [{"mesh_dim": 0, "src": "S(0)", "dst": "S(1)"}],
           "comm_counts": {"_dtensor.shard_dim_alltoall": 1}},
          {"id": "l", "kind": "redistribute", "global_shape": [4, 4], "mesh_shape": [4], "src": ["S(0)"],
           "dst": ["S(1)"], "steps": [{"mesh_dim": 0, "src": "S(0)", "dst": "S(1)"}],
           "comm_counts": {"_dtensor.shard_dim_alltoall": 1}, "device_type": "cpu"},
          {"id": "i", "kind": "local", "global_shape": [5]},
          {"id": "j", "kind": "local", "excluded": "uneven _StridedShard"}
        ]}"#;
        let r = check_cases_json(text).unwrap();
        assert_eq!(r.torch_version.as_deref(), Some("2.15.0"));
        let fails: Vec<&str> = r
            .results
            .iter()
            .filter(|c| matches!(c.outcome, CaseOutcome::Fail { .. }))
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(fails, vec!["d", "h", "l", "i"]);
        assert_eq!(r.counts(), (7, 4, 1));
        assert!(check_cases_json("[]").is_err());
        assert!(check_cases_json("{\"format\": \"x\", \"cases\": []}").is_err());
    }
}
