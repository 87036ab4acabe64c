//! The `parallel` suite: for every plan and every golden fixture, the distributed block
//! ([`DistBlock`]) on this world against the single-device reference loop
//! (`moe_kernels::reference`), with every shard's shape checked against `placement`:
//!
//! - sharded shapes: the expert shards loaded from the checkpoint by `from_hf_local`, the output
//!   and input-gradient rows and every parameter-gradient shard have the local shape `placement`
//!   gives; `down_projs` transposed to `[E, H, I]` keeps a consistent placement (`S(1)` -> `S(2)`);
//! - output and grad_input gathered to full are within the float32 bar ([`crate::bar`]) of the
//!   single-device reference run in float64 (which `golden` holds to transformers' float64 truth);
//! - every parameter gradient gathered to full is within that bar, in the native layout and,
//!   converted shard by shard with `to_hf_local`, in the HF layout.

use super::block::DistBlock;
use super::comms::PlanComms;
use super::plan::{Mutation, ParallelPlan, Param, PlanKind};
use super::shards::{host, indices, is_extra_replica, take, BlockTensors, FullShapes};
use crate::bar::{self, Truth};
use crate::family::{grads_by_native_key, moe_config, BlockWeights};
use crate::gather::gather_full;
use crate::golden::{host_f64, GoldenFile};
use crate::report::Check;
use adapters::{adapter_for, HfCheckpoint, HostTensor, LocalTensor, MoeAdapter, NativeMoeKeys};
use collectives::Communicator;
use moe_kernels::{bound, MoeConfig, MoeGrads};
use ndarray::{Array2, ArrayView2};
use placement::{local_shard, transpose_placements, validate_global_shape};
use std::collections::BTreeMap;
use std::path::Path;

/// A golden fixture loaded for the distributed checks.
pub struct Fixture {
    pub label: String,
    pub ckpt: HfCheckpoint,
    pub adapter: Box<dyn MoeAdapter>,
    pub cfg: MoeConfig,
    pub keys: NativeMoeKeys,
    pub weights: BlockWeights,
    /// `[T, H]` golden input and output gradient (float32-representable; f64 copies below).
    pub input: Array2<f32>,
    pub grad_output: Array2<f32>,
    pub input64: Array2<f64>,
    pub grad_output64: Array2<f64>,
}

impl Fixture {
    /// Loads `dir` (an HF checkpoint with `golden.safetensors`).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let golden =
            GoldenFile::open(&dir.join("golden.safetensors")).map_err(|e| e.to_string())?;
        let ckpt = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
        let adapter = adapter_for(&ckpt).map_err(|e| e.to_string())?;
        let model_type = ckpt.model_type().map_err(|e| e.to_string())?.to_string();
        let layer: usize = golden
            .meta("layer")
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| format!("{label}: metadata 'layer': {e}"))?;
        let cfg = moe_config(&model_type, ckpt.config(), layer)?;
        let keys = adapter.native_moe_keys(layer).map_err(|e| e.to_string())?;
        let native = adapter.from_hf(&ckpt).map_err(|e| e.to_string())?;
        let weights = BlockWeights::load(&native, &keys)?;
        let input64 = golden.matrix("input").map_err(|e| e.to_string())?;
        let grad_output64 = golden.matrix("grad_output").map_err(|e| e.to_string())?;
        Ok(Fixture {
            label,
            ckpt,
            adapter,
            cfg,
            keys,
            weights,
            input: input64.mapv(|v| v as f32),
            grad_output: grad_output64.mapv(|v| v as f32),
            input64,
            grad_output64,
        })
    }
}

/// Single-device reference of the fixture's block in float64 (the per-expert loop of
/// `moe_kernels::reference`), with the error coefficients of every result
/// ([`moe_kernels::bound`]).
pub struct Reference {
    /// The float64 truth.
    pub output: Array2<f64>,
    pub grads: MoeGrads<f64>,
    /// Its float32 error coefficients (bar 1).
    pub mags: bound::BlockMagnitudes,
    /// The single-device float32 reference loop on the same values: the independent float32
    /// evaluation of bar 2 (`crate::bar`).
    pub output32: Array2<f32>,
    pub grads32: MoeGrads<f32>,
}

impl Reference {
    pub fn compute(fx: &Fixture) -> Result<Self, String> {
        let w64: BlockWeights<f64> = fx.weights.cast();
        let p = w64.params(&fx.keys)?;
        let (x, go) = (fx.input64.view(), fx.grad_output64.view());
        let fwd = moe_kernels::reference::moe_forward::<f64>(x, &p, &fx.cfg)
            .map_err(|e| e.to_string())?;
        let grads = moe_kernels::reference::moe_backward::<f64>(x, &p, &fx.cfg, &fwd, go)
            .map_err(|e| e.to_string())?;
        let mags = bound::block_magnitudes(x, &p, &fx.cfg, go).map_err(|e| e.to_string())?;
        let p32 = fx.weights.params(&fx.keys)?;
        let (x32, go32) = (fx.input.view(), fx.grad_output.view());
        let fwd32 = moe_kernels::reference::moe_forward::<f32>(x32, &p32, &fx.cfg)
            .map_err(|e| e.to_string())?;
        let grads32 = moe_kernels::reference::moe_backward::<f32>(x32, &p32, &fx.cfg, &fwd32, go32)
            .map_err(|e| e.to_string())?;
        Ok(Reference {
            output: fwd.output,
            grads,
            mags,
            output32: fwd32.output,
            grads32,
        })
    }
}

/// Runs every plan of `plans` on the fixture in `dir`. Collective over `comm`.
pub fn run(
    comm: &dyn Communicator,
    dir: &Path,
    plans: &[PlanKind],
    mutation: Option<Mutation>,
) -> Result<Vec<Check>, String> {
    let fx = Fixture::load(dir)?;
    let reference = Reference::compute(&fx)?;
    let mut checks = Vec::new();
    for &kind in plans {
        let plan = match ParallelPlan::new(kind, comm.size()) {
            Ok(p) => p,
            Err(why) => {
                checks.push(Check::skip(format!("{}: {}", fx.label, kind.name()), why));
                continue;
            }
        };
        checks.extend(run_plan(comm, &fx, &reference, &plan, mutation));
    }
    Ok(checks)
}

/// Local work of one rank: the shards it sends to the gather, and its shape findings.
struct Local {
    tensors: Vec<LocalTensor>,
    shape_problems: Vec<String>,
    /// Gradient shards `to_hf_local` could not convert.
    conversion_problems: Vec<String>,
}

fn token_tensor(
    key: &str,
    a: &Array2<f32>,
    global: &[usize],
    plan: &ParallelPlan,
    coord: &[usize],
    problems: &mut Vec<String>,
) -> Result<Option<LocalTensor>, String> {
    let placements = plan.placements(Param::Tokens);
    let want = local_shard(global, &plan.mesh, &placements, coord)
        .map_err(|e| e.to_string())?
        .local_shape;
    if a.shape() != want.as_slice() {
        problems.push(format!(
            "{key}: local shape {:?}, placement says {want:?}",
            a.shape()
        ));
    }
    // Replicas (TP without SP): only coordinate 0 sends.
    if is_extra_replica(&placements, coord) {
        return Ok(None);
    }
    Ok(Some(LocalTensor {
        key: key.to_string(),
        tensor: host(a)?,
        global_shape: global.to_vec(),
        indices: indices(global, plan, &placements, coord)?,
        placements,
    }))
}

fn local_work(
    comms: &PlanComms,
    fx: &Fixture,
    plan: &ParallelPlan,
    mutation: Option<Mutation>,
) -> Result<Local, String> {
    let coord = comms.coord.clone();
    let full = fx.weights.params(&fx.keys)?;
    let shapes = FullShapes::of(&full);
    let (tokens, hidden) = fx.input.dim();
    let inter = shapes.down_projs[1];
    let mut problems = Vec::new();
    let params = BlockTensors::shard(&full, plan, &coord)?;
    // The checkpoint's own load path must give the same shards, with placement's shapes.
    let expert_keys = [
        (Some(&fx.keys.gate_and_up_projs), Param::GateAndUp),
        (Some(&fx.keys.down_projs), Param::Down),
        (fx.keys.gate_up_proj_bias.as_ref(), Param::GateUpBias),
        (fx.keys.down_proj_bias.as_ref(), Param::DownBias),
    ];
    let cut = params.to_local_tensors(&fx.keys, plan, &coord, &shapes, false)?;
    for (key, param) in expert_keys {
        let Some(key) = key else { continue };
        let placements = plan.placements(param);
        let lt = fx
            .adapter
            .from_hf_local(&fx.ckpt, key, &plan.mesh, &placements, &coord)
            .map_err(|e| e.to_string())?;
        if lt.placements != placements {
            problems.push(format!(
                "{key} loaded by from_hf_local: label {}, the plan says {}",
                placement::format_placements(&lt.placements),
                placement::format_placements(&placements)
            ));
        } else if let Err(e) = lt.check_label(&plan.mesh, &coord) {
            problems.push(format!("loaded by from_hf_local: {e}"));
        } else if let Some(c) = cut.iter().find(|c| &c.key == key) {
            if lt.tensor.to_f32_vec().map_err(|e| e.to_string())?
                != c.tensor.to_f32_vec().map_err(|e| e.to_string())?
            {
                problems.push(format!("{key}: shard loaded by from_hf_local differs from the slice of the full tensor"));
            }
        }
    }
    let rows = indices(
        &[tokens, hidden],
        plan,
        &plan.placements(Param::Tokens),
        &coord,
    )?;
    let x = take(fx.input.view(), &rows);
    let dout = take(fx.grad_output.view(), &rows);
    let block = DistBlock {
        plan,
        comms,
        cfg: fx.cfg,
        params: &params,
        num_experts: shapes.gate_weight[0],
        mutation,
    };
    let (out, ctx) = block.forward(x.view(), tokens, hidden, inter)?;
    let (dx, grads) = block.backward(&ctx, x.view(), dout.view())?;

    let mut tensors = Vec::new();
    for (key, a) in [("act:output", &out), ("act:grad_input", &dx)] {
        tensors.extend(token_tensor(
            key,
            a,
            &[tokens, hidden],
            plan,
            &coord,
            &mut problems,
        )?);
    }
    // Gradient shards: shapes vs placement, and the transposed down_projs' placement.
    let native = grads.to_local_tensors(&fx.keys, plan, &coord, &shapes, false)?;
    for lt in &native {
        if let Err(e) = lt.check_label(&plan.mesh, &coord) {
            problems.push(format!("grad {e}"));
        }
        if lt.key == fx.keys.down_projs {
            problems.extend(check_transposed(lt, plan, &coord, mutation));
        }
    }
    let mut conversion_problems = Vec::new();
    for lt in grads.to_local_tensors(&fx.keys, plan, &coord, &shapes, true)? {
        match fx.adapter.to_hf_local(&lt) {
            Ok(hfs) => {
                for hf in hfs {
                    if let Err(e) = hf.check_label(&plan.mesh, &coord) {
                        conversion_problems.push(format!("grad {e}"));
                    }
                    tensors.push(LocalTensor {
                        key: format!("hf:{}", hf.key),
                        ..hf
                    });
                }
            }
            Err(e) => conversion_problems.push(e.to_string()),
        }
        tensors.push(LocalTensor {
            key: format!("native:{}", lt.key),
            ..lt
        });
    }
    Ok(Local {
        tensors,
        shape_problems: problems,
        conversion_problems,
    })
}

/// `down_projs` `[E, I, H]` transposed to `[E, H, I]` (as HF's fused layout stores it): its placements
/// must move through the transpose (`S(1)` -> `S(2)`); checked with `validate_global_shape`.
fn check_transposed(
    lt: &LocalTensor,
    plan: &ParallelPlan,
    coord: &[usize],
    mutation: Option<Mutation>,
) -> Option<String> {
    let t = lt.tensor.transpose(1, 2).ok()?;
    let g = &lt.global_shape;
    let global_t = [g[0], g[2], g[1]];
    let placements = if mutation == Some(Mutation::KeepShardAfterTranspose) {
        lt.placements.clone()
    } else {
        match transpose_placements(&lt.placements, 3, 1, 2) {
            Ok(p) => p,
            Err(e) => return Some(format!("{}: transpose placements: {e}", lt.key)),
        }
    };
    validate_global_shape(&t.shape, &global_t, &plan.mesh, &placements, coord)
        .err()
        .map(|e| {
            format!(
                "{} transposed to [E, H, I] with {}: {e}",
                lt.key,
                placement::format_placements(&placements)
            )
        })
}

/// A truth tensor of the comparison: values, error coefficients, the float32 reference's values.
struct Expected {
    truth: HostTensor,
    mags: Vec<f64>,
    f32_ref: Vec<f64>,
}

fn compare_check(name: String, got: Option<&HostTensor>, want: &Expected) -> Check {
    let Some(got) = got else {
        return Check::fail(name, "not produced by the distributed run");
    };
    if got.shape != want.truth.shape {
        return Check::fail(
            name,
            format!("shape {:?} != reference {:?}", got.shape, want.truth.shape),
        );
    }
    match (host_f64(got), host_f64(&want.truth)) {
        (Ok(g), Ok(w)) => bar::check_f32(
            name,
            &g,
            &Truth {
                values: &w,
                mags: &want.mags,
                f32_ref: Some(&want.f32_ref),
            },
        ),
        (Err(e), _) | (_, Err(e)) => Check::fail(name, e),
    }
}

fn matrix_tensor(a: ArrayView2<f64>) -> Result<HostTensor, String> {
    let data = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    HostTensor::new(adapters::Dtype::F64, a.shape().to_vec(), data).map_err(|e| e.to_string())
}

fn run_plan(
    comm: &dyn Communicator,
    fx: &Fixture,
    reference: &Reference,
    plan: &ParallelPlan,
    mutation: Option<Mutation>,
) -> Vec<Check> {
    let tag = format!("{}: {}", fx.label, plan.label());
    let comms = match PlanComms::new(comm, plan) {
        Ok(c) => c,
        Err(e) => return vec![Check::fail(format!("{tag}: setup"), e)],
    };
    let local = local_work(&comms, fx, plan, mutation);
    let (send, problems, conversion) = match local {
        Ok(l) => (Ok(l.tensors), l.shape_problems, l.conversion_problems),
        Err(e) => (Err(e), Vec::new(), Vec::new()),
    };
    // Every rank's findings, then the shards: all collective, so all ranks report the same.
    let all_problems = gather_findings(comm, &problems);
    let all_conversion = gather_findings(comm, &conversion);
    let mut checks = vec![
        Check::expect(
            format!("{tag}: sharded shapes"),
            all_problems.is_empty(),
            "every shard matches placement",
            || all_problems.join("; "),
        ),
        Check::expect(
            format!("{tag}: gradient shards to HF layout (to_hf_local)"),
            all_conversion.is_empty(),
            "every shard converted without communication",
            || all_conversion.join("; "),
        ),
    ];
    let full = match gather_full(comm, &send) {
        Ok(f) => f,
        Err(e) => {
            checks.push(Check::fail(
                format!("{tag}: distributed forward/backward"),
                e,
            ));
            return checks;
        }
    };
    let expected = match expected_tensors(fx, reference) {
        Ok(e) => e,
        Err(e) => {
            checks.push(Check::fail(format!("{tag}: reference"), e));
            return checks;
        }
    };
    for (key, want) in &expected {
        let what = key
            .strip_prefix("act:")
            .map(str::to_string)
            .or_else(|| key.strip_prefix("native:").map(|k| format!("grad {k}")))
            .or_else(|| {
                key.strip_prefix("hf:")
                    .map(|k| format!("grad (HF layout) {k}"))
            })
            .unwrap_or_else(|| key.clone());
        checks.push(compare_check(format!("{tag}: {what}"), full.get(key), want));
    }
    checks
}

/// Every rank's findings, each prefixed with its rank (collective).
fn gather_findings(comm: &dyn Communicator, mine: &[String]) -> Vec<String> {
    let blob = serde_json::to_vec(mine).unwrap_or_default();
    match crate::gather::all_gather_blobs(comm, &blob) {
        Ok(blobs) => blobs
            .iter()
            .enumerate()
            .flat_map(|(r, b)| {
                serde_json::from_slice::<Vec<String>>(b)
                    .unwrap_or_else(|e| vec![format!("malformed report: {e}")])
                    .into_iter()
                    .map(move |p| format!("rank {r}: {p}"))
            })
            .collect(),
        Err(e) => vec![e],
    }
}

/// The reference's output, grad_input and gradients (F64) with their error coefficients, keyed as
/// the distributed run sends them.
fn expected_tensors(
    fx: &Fixture,
    reference: &Reference,
) -> Result<BTreeMap<String, Expected>, String> {
    let mut out = BTreeMap::new();
    let m = &reference.mags;
    let f64s = |a: &Array2<f32>| a.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
    out.insert(
        "act:output".into(),
        Expected {
            truth: matrix_tensor(reference.output.view())?,
            mags: m.output.iter().copied().collect(),
            f32_ref: f64s(&reference.output32),
        },
    );
    out.insert(
        "act:grad_input".into(),
        Expected {
            truth: matrix_tensor(reference.grads.grad_input.view())?,
            mags: m.grad_input.iter().copied().collect(),
            f32_ref: f64s(&reference.grads32.grad_input),
        },
    );
    let native = grads_by_native_key(&reference.grads, &fx.keys)?;
    let native_m = grads_by_native_key(&m.grads, &fx.keys)?;
    let native_32 = grads_by_native_key(&reference.grads32, &fx.keys)?;
    let hf = fx.adapter.to_hf(&native).map_err(|e| e.to_string())?;
    let hf_m = fx.adapter.to_hf(&native_m).map_err(|e| e.to_string())?;
    let hf_32 = fx.adapter.to_hf(&native_32).map_err(|e| e.to_string())?;
    let entry = |t: HostTensor, m: &HostTensor, r: &HostTensor| -> Result<Expected, String> {
        Ok(Expected {
            truth: t,
            mags: host_f64(m)?,
            f32_ref: host_f64(r)?,
        })
    };
    for (k, t) in native {
        let e = entry(t, &native_m[&k], &native_32[&k])?;
        out.insert(format!("native:{k}"), e);
    }
    for (k, t) in hf {
        let e = entry(t, &hf_m[&k], &hf_32[&k])?;
        out.insert(format!("hf:{k}"), e);
    }
    Ok(out)
}
