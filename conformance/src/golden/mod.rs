//! `golden`: the MoE block of one layer, run forward and backward by `moe-kernels` (the reference
//! in float64 and float32, and the fast float32 path) on weights loaded through `adapters`, against
//! the float64 truth transformers computed; gradients are mapped back to HF disk keys by the
//! adapter's `to_hf`, the same code that maps weights.
//!
//! A fixture directory holds an HF checkpoint (config.json + safetensors, bf16) and
//! `golden.safetensors` in format `golden/2` (header metadata `format`): `input` [T, H],
//! `grad_output` [T, H] (float32-representable), `output`, `grad_input`, `grad.<HF key>`, all F64,
//! computed by transformers with the model in float64 (the saved bf16 weights upcast), and the
//! float32 transformers results beside them as `f32.*` (for reference); metadata `model_type`,
//! `layer`, `tokens`. The bars ([`crate::bar`]): the float64 reference within a normwise relative
//! error of 1e-12 of the truth, every float32 path within the elementwise float32 bound of
//! [`moe_kernels::bound`].

pub mod fault;

pub use fault::Fault;

use crate::bar::{self, Truth};
use crate::family::{grads_by_native_key, moe_config, BlockWeights};
use crate::report::Check;
use adapters::{adapter_for, HfCheckpoint, HostTensor};
use moe_kernels::{bound, MoeConfig, MoeForward, MoeGrads, MoeParams};
use ndarray::{Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The golden-file format this checker reads (header metadata `format`).
pub const GOLDEN_FORMAT: &str = "golden/2";

/// Errors that make a golden fixture unusable (as opposed to a numeric mismatch, which is a failed check).
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error(transparent)]
    Adapter(#[from] adapters::AdapterError),
    #[error("{}: {message}", path.display())]
    Fixture { path: PathBuf, message: String },
    #[error(transparent)]
    Kernel(#[from] moe_kernels::KernelError),
}

/// The decoded `golden.safetensors`: tensors by name as f64 (F64 as they are, F32 upcast), plus
/// header metadata.
pub struct GoldenFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub metadata: HashMap<String, String>,
}

impl GoldenFile {
    /// Reads and validates `golden.safetensors`: a regular file, format `golden/2`, the truth
    /// tensors F64, the `f32.*` ones F32 and the `bf16.*` ones BF16. Errors (one line naming the file): anything else,
    /// e.g. the old all-F32 format 1 ("regenerate it").
    pub fn open(path: &Path) -> Result<Self, GoldenError> {
        let err = |message: String| GoldenError::Fixture {
            path: path.to_path_buf(),
            message,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(err("not a regular file".into())),
            Err(e) => return Err(err(e.to_string())),
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("invalid safetensors: {e}")))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("invalid header: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        match metadata.get("format").map(String::as_str) {
            Some(GOLDEN_FORMAT) => {}
            None => {
                return Err(err(format!(
                    "golden format 1 (all F32, no 'format' metadata): a float32 result, not a truth; regenerate it (format {GOLDEN_FORMAT}, float64 truth)"
                )))
            }
            Some(other) => {
                return Err(err(format!(
                    "golden format '{other}' (this checker reads {GOLDEN_FORMAT})"
                )))
            }
        }
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let want = if name.starts_with("f32.") {
                Dtype::F32
            } else if name.starts_with("bf16.") {
                Dtype::BF16
            } else {
                Dtype::F64
            };
            if view.dtype() != want {
                return Err(err(format!(
                    "tensor '{name}' is {:?}, expected {want:?} in format {GOLDEN_FORMAT}",
                    view.dtype()
                )));
            }
            let data: Vec<f64> = match want {
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                _ => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            };
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(GoldenFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// A tensor as a 2-D array, checking its rank.
    pub fn matrix(&self, name: &str) -> Result<Array2<f64>, GoldenError> {
        let err = |message: String| GoldenError::Fixture {
            path: self.path.clone(),
            message,
        };
        let (shape, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| err(format!("tensor '{name}' missing")))?;
        if shape.len() != 2 {
            return Err(err(format!(
                "tensor '{name}' has shape {shape:?}, expected [T, H]"
            )));
        }
        Array2::from_shape_vec((shape[0], shape[1]), data.clone())
            .map_err(|e| err(format!("'{name}': {e}")))
    }

    /// A header metadata entry.
    pub fn meta(&self, key: &str) -> Result<&str, GoldenError> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| GoldenError::Fixture {
                path: self.path.clone(),
                message: format!("header metadata '{key}' missing"),
            })
    }
}

/// The values of an F32 / F64 host tensor as f64.
pub fn host_f64(t: &HostTensor) -> Result<Vec<f64>, String> {
    match t.dtype {
        Dtype::F64 => Ok(t
            .data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()),
        _ => t
            .to_f32_vec()
            .map(|v| v.into_iter().map(f64::from).collect())
            .map_err(|e| e.to_string()),
    }
}

type Forward<F> =
    fn(ArrayView2<F>, &MoeParams<F>, &MoeConfig) -> moe_kernels::Result<MoeForward<F>>;
type Backward<F> = fn(
    ArrayView2<F>,
    &MoeParams<F>,
    &MoeConfig,
    &MoeForward<F>,
    ArrayView2<F>,
) -> moe_kernels::Result<MoeGrads<F>>;

/// What a path computed, by tensor name (`output`, `grad_input`, `grad.<HF key>`), as f64.
type Results = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// How a path's gradients go back to HF disk keys: the adapter and the layer's native keys.
struct ToDisk<'a> {
    adapter: &'a dyn adapters::MoeAdapter,
    keys: &'a adapters::NativeMoeKeys,
    err: &'a dyn Fn(String) -> GoldenError,
}

/// One path: its forward and backward, on float32 or float64 `F`.
struct PathFns<F: moe_kernels::Real> {
    forward: Forward<F>,
    backward: Backward<F>,
}

/// Every parameter of layer `layer`'s MoE block in `native` is finite: a NaN or infinite weight
/// (which conversions carry bit for bit) makes no forward to compare. Error: the key, the element
/// and its value.
fn check_finite(
    native: &BTreeMap<String, HostTensor>,
    keys: &adapters::NativeMoeKeys,
    layer: usize,
) -> Result<(), String> {
    let mut names: Vec<&String> =
        vec![&keys.gate_weight, &keys.gate_and_up_projs, &keys.down_projs];
    names.extend(
        [
            &keys.gate_bias,
            &keys.e_score_correction_bias,
            &keys.gate_up_proj_bias,
            &keys.down_proj_bias,
            &keys.shared_gate,
        ]
        .into_iter()
        .flatten(),
    );
    names.extend(keys.shared.iter().flatten());
    for k in names {
        let Some(t) = native.get(k) else { continue };
        let v = t.to_f32_vec().map_err(|e| format!("'{k}': {e}"))?;
        if let Some(flat) = v.iter().position(|x| !x.is_finite()) {
            let mut idx = vec![0; t.shape.len()];
            let mut rest = flat;
            for (d, &n) in t.shape.iter().enumerate().rev() {
                idx[d] = rest % n;
                rest /= n;
            }
            return Err(format!(
                "layer {layer}: '{k}' element {idx:?} is {} (the MoE block forward needs finite parameters)",
                v[flat]
            ));
        }
    }
    Ok(())
}

/// Runs one path (float32 or float64 `F`) and maps its gradients to the HF disk keys.
fn run_path<F: moe_kernels::Real>(
    path: PathFns<F>,
    x: ArrayView2<F>,
    params: &MoeParams<F>,
    cfg: &MoeConfig,
    grad_output: ArrayView2<F>,
    to: &ToDisk,
) -> Result<Results, GoldenError> {
    let fwd = (path.forward)(x, params, cfg)?;
    let g = (path.backward)(x, params, cfg, &fwd, grad_output)?;
    let as64 = |a: &Array2<F>| a.iter().map(|v| v.to_f64_lossless()).collect::<Vec<f64>>();
    let mut out = Results::new();
    out.insert(
        "output".into(),
        (fwd.output.shape().to_vec(), as64(&fwd.output)),
    );
    out.insert(
        "grad_input".into(),
        (g.grad_input.shape().to_vec(), as64(&g.grad_input)),
    );
    let hf = to
        .adapter
        .to_hf(&grads_by_native_key(&g, to.keys).map_err(to.err)?)?;
    for (k, t) in hf {
        out.insert(
            format!("grad.{k}"),
            (t.shape.clone(), host_f64(&t).map_err(to.err)?),
        );
    }
    Ok(out)
}

/// Runs the golden checks of the fixture in `dir` (module docs): the float64 reference, the
/// float32 reference and the fast float32 path, each on the block output, `grad_input` and every
/// parameter gradient mapped back to its HF disk key through the adapter's `to_hf`.
pub fn run(dir: &Path) -> Result<Vec<Check>, GoldenError> {
    run_with(dir, None)
}

/// [`run`] with a deliberate [`Fault`] in the fast float32 path (its checks are named
/// `fast+<fault>`); the reference paths run without it. Errors: those of [`run`], and a fault the
/// fixture cannot show (e.g. `transpose-expert-weight` needs `H == 2I`).
pub fn run_with(dir: &Path, fault: Option<Fault>) -> Result<Vec<Check>, GoldenError> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fixture_err = |message: String| GoldenError::Fixture {
        path: dir.to_path_buf(),
        message,
    };
    let golden = GoldenFile::open(&dir.join("golden.safetensors"))?;
    let ckpt = HfCheckpoint::open(dir)?;
    let adapter = adapter_for(&ckpt)?;
    let model_type = ckpt.model_type()?.to_string();
    if golden.meta("model_type")? != model_type {
        return Err(GoldenError::Fixture {
            path: golden.path.clone(),
            message: format!(
                "model_type '{}' != config.json's '{model_type}'",
                golden.meta("model_type")?
            ),
        });
    }
    let layer: usize = golden
        .meta("layer")?
        .parse()
        .map_err(|e| GoldenError::Fixture {
            path: golden.path.clone(),
            message: format!("metadata 'layer' is not an integer: {e}"),
        })?;
    let cfg = moe_config(&model_type, ckpt.config(), layer).map_err(fixture_err)?;
    let keys = adapter.native_moe_keys(layer)?;
    let native = adapter.from_hf(&ckpt)?;
    check_finite(&native, &keys, layer).map_err(fixture_err)?;
    let w32 = BlockWeights::load(&native, &keys).map_err(fixture_err)?;
    let w64: BlockWeights<f64> = w32.cast();
    let p32 = w32.params(&keys).map_err(fixture_err)?;
    let p64 = w64.params(&keys).map_err(fixture_err)?;
    let x64 = golden.matrix("input")?;
    let go64 = golden.matrix("grad_output")?;
    for (name, a) in [("input", &x64), ("grad_output", &go64)] {
        if let Some(i) = a.iter().position(|v| !v.is_finite()) {
            return Err(GoldenError::Fixture {
                path: golden.path.clone(),
                message: format!(
                    "'{name}' element [{}, {}] is {} (not finite)",
                    i / a.ncols().max(1),
                    i % a.ncols().max(1),
                    a.iter().nth(i).copied().unwrap_or_default()
                ),
            });
        }
        if a.iter().any(|&v| f64::from(v as f32) != v) {
            return Err(GoldenError::Fixture {
                path: golden.path.clone(),
                message: format!("'{name}' is not float32-representable (the float32 paths would start from another input)"),
            });
        }
    }
    let x32 = x64.mapv(|v| v as f32);
    let go32 = go64.mapv(|v| v as f32);
    let hidden = x64.ncols();
    if p64.gate_weight.ncols() != hidden {
        return Err(GoldenError::Fixture {
            path: golden.path.clone(),
            message: format!(
                "'input' has H = {hidden} but the router {} is [{}, {}]",
                keys.gate_weight,
                p64.gate_weight.nrows(),
                p64.gate_weight.ncols()
            ),
        });
    }

    // The error coefficients of every result, through the same adapter mapping.
    let mags = bound::block_magnitudes(x64.view(), &p64, &cfg, go64.view())?;
    let mut mag: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    mag.insert("output".into(), mags.output.iter().copied().collect());
    mag.insert(
        "grad_input".into(),
        mags.grad_input.iter().copied().collect(),
    );
    for (k, t) in adapter.to_hf(&grads_by_native_key(&mags.grads, &keys).map_err(fixture_err)?)? {
        mag.insert(format!("grad.{k}"), host_f64(&t).map_err(fixture_err)?);
    }
    let mut truth_names: Vec<&String> = golden
        .tensors
        .keys()
        .filter(|k| *k == "output" || *k == "grad_input" || k.starts_with("grad."))
        .collect();
    truth_names.sort();
    let mut checks = Vec::new();
    let to = ToDisk {
        adapter: adapter.as_ref(),
        keys: &keys,
        err: &fixture_err,
    };
    // The fast path's weights, with the fault when one is asked for.
    let mut wf = w32.clone();
    let mut fast_path = PathFns {
        forward: moe_kernels::fast::moe_forward as Forward<f32>,
        backward: moe_kernels::fast::moe_backward as Backward<f32>,
    };
    let fast_name = match fault {
        None => "fast".to_string(),
        Some(f) => {
            let routed = moe_kernels::fast::router_forward(
                x32.view(),
                p32.gate_weight,
                p32.gate_bias,
                p32.e_score_correction_bias,
                &cfg,
            )?
            .1;
            let mut tokens = vec![0usize; p32.gate_weight.nrows()];
            routed.top_k_index.iter().for_each(|&e| tokens[e] += 1);
            f.apply(&mut wf, &keys, &tokens).map_err(&fixture_err)?;
            if f == Fault::DropRoutingWeight {
                fast_path.forward = fault::forward_without_routing_weights;
            }
            format!("fast+{}", f.name())
        }
    };
    let pf = wf.params(&keys).map_err(fixture_err)?;
    let results = [
        (
            "reference f64".to_string(),
            true,
            run_path(
                PathFns {
                    forward: moe_kernels::reference::moe_forward::<f64>,
                    backward: moe_kernels::reference::moe_backward::<f64>,
                },
                x64.view(),
                &p64,
                &cfg,
                go64.view(),
                &to,
            )?,
        ),
        (
            "reference".to_string(),
            false,
            run_path(
                PathFns {
                    forward: moe_kernels::reference::moe_forward::<f32>,
                    backward: moe_kernels::reference::moe_backward::<f32>,
                },
                x32.view(),
                &p32,
                &cfg,
                go32.view(),
                &to,
            )?,
        ),
        (
            fast_name,
            false,
            run_path(fast_path, x32.view(), &pf, &cfg, go32.view(), &to)?,
        ),
    ];
    for (path, is64, got) in &results {
        let tag = format!("{label}: layer {layer} {path}");
        for name in &truth_names {
            let check_name = format!("{tag} {name}");
            let (tshape, tvals) = &golden.tensors[*name];
            let Some((gshape, gvals)) = got.get(*name) else {
                checks.push(Check::fail(
                    check_name,
                    "no result computed for this tensor",
                ));
                continue;
            };
            if gshape != tshape {
                checks.push(Check::fail(
                    check_name,
                    format!("shape {gshape:?} != golden {tshape:?}"),
                ));
                continue;
            }
            if *is64 {
                checks.push(bar::check_f64(check_name, gvals, tvals));
                continue;
            }
            let Some(m) = mag.get(*name) else {
                checks.push(Check::fail(check_name, "no error bound for this tensor"));
                continue;
            };
            let f32_ref = golden
                .tensors
                .get(&format!("f32.{name}"))
                .map(|(_, v)| v.as_slice());
            checks.push(bar::check_f32(
                check_name,
                gvals,
                &Truth {
                    values: tvals,
                    mags: m,
                    f32_ref,
                },
            ));
        }
        let extra: Vec<&String> = got
            .keys()
            .filter(|k| k.starts_with("grad.") && !golden.tensors.contains_key(*k))
            .collect();
        if !extra.is_empty() {
            checks.push(Check::fail(
                format!("{tag} gradient keys"),
                format!("computed but not in golden: {extra:?}"),
            ));
        }
    }
    Ok(checks)
}
