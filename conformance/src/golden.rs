//! `golden`: the MoE block of one layer, run forward and backward by `moe-kernels` (reference and
//! fast CPU paths) on weights loaded through `adapters`, against what transformers computed (format:
//! ../shared/reference/fixtures.md); gradients are mapped back to HF disk keys by the adapter's
//! `to_hf`, the same code that maps weights.
//!
//! A fixture directory holds an HF checkpoint (config.json + safetensors, bf16) and
//! `golden.safetensors` (all F32): `input` [T, H], `output` [T, H], `grad_output` [T, H],
//! `grad_input` [T, H], `grad.<HF key>`, with header metadata `model_type`, `layer`, `tokens`.

use crate::family::{grads_by_native_key, moe_config, BlockWeights};
use crate::report::Check;
use adapters::{adapter_for, HfCheckpoint};
use moe_kernels::{MoeConfig, MoeForward, MoeGrads, MoeParams};
use ndarray::{Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Comparison bar: |got - expected| <= atol + rtol * |expected| elementwise (torch.allclose).
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

/// The f32 bar of the HF tensor-parallel tests (atol = rtol = 1e-5).
pub const F32_TOLERANCE: Tolerance = Tolerance {
    atol: 1e-5,
    rtol: 1e-5,
};

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

/// The decoded `golden.safetensors`: F32 tensors by name, plus header metadata.
pub struct GoldenFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

impl GoldenFile {
    /// Reads and validates `golden.safetensors` (every tensor must be F32).
    pub fn open(path: &Path) -> Result<Self, GoldenError> {
        let err = |message: String| GoldenError::Fixture {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("invalid safetensors: {e}")))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("invalid header: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(err(format!(
                    "tensor '{name}' is {:?}, golden tensors must be F32",
                    view.dtype()
                )));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(GoldenFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// A tensor as a 2-D array, checking its rank.
    pub fn matrix(&self, name: &str) -> Result<Array2<f32>, GoldenError> {
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

/// Largest |a - b|, and the number of elements outside the tolerance (shapes must match).
pub fn compare(got: ArrayView2<f32>, expected: ArrayView2<f32>, tol: Tolerance) -> (f32, usize) {
    got.iter()
        .zip(expected.iter())
        .fold((0.0f32, 0usize), |(max, bad), (&g, &e)| {
            let d = (g - e).abs();
            let ok = d <= tol.atol + tol.rtol * e.abs() && d.is_finite();
            (max.max(d), bad + usize::from(!ok))
        })
}

/// Compares a computed tensor with a golden one of the same name; one check.
fn compare_check(
    name: String,
    got: ArrayView2<f32>,
    expected: ArrayView2<f32>,
    tol: Tolerance,
) -> Check {
    if got.dim() != expected.dim() {
        return Check::fail(
            name,
            format!("shape {:?} != {:?}", got.dim(), expected.dim()),
        );
    }
    let (max, bad) = compare(got, expected, tol);
    Check::expect(name, bad == 0, format!("max abs diff {max:.3e}"), || {
        format!(
            "{bad} of {} elements outside atol {:e} rtol {:e}; max abs diff {max:.3e}",
            expected.len(),
            tol.atol,
            tol.rtol
        )
    })
}

/// A golden or computed tensor of any rank viewed as 2-D [rows, last dim] for comparison.
fn as_matrix(shape: &[usize], data: Vec<f32>) -> Result<Array2<f32>, String> {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = if shape.is_empty() {
        1
    } else {
        shape[..shape.len() - 1].iter().product()
    };
    Array2::from_shape_vec((rows, if shape.is_empty() { 1 } else { cols }), data)
        .map_err(|e| e.to_string())
}

type Forward = fn(ArrayView2<f32>, &MoeParams, &MoeConfig) -> moe_kernels::Result<MoeForward>;
type Backward = fn(
    ArrayView2<f32>,
    &MoeParams,
    &MoeConfig,
    &MoeForward,
    ArrayView2<f32>,
) -> moe_kernels::Result<MoeGrads>;

/// Runs the golden checks of the fixture in `dir` at tolerance `tol`: for the reference and the
/// fast CPU path, the block output, `grad_input`, and every parameter gradient mapped back to its HF
/// disk key through the adapter's `to_hf` (the same code that maps weights).
pub fn run(dir: &Path, tol: Tolerance) -> Result<Vec<Check>, GoldenError> {
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
    let cfg = moe_config(&model_type, ckpt.config()).map_err(fixture_err)?;
    let keys = adapter.native_moe_keys(layer)?;
    let native = adapter.from_hf(&ckpt)?;
    let weights = BlockWeights::load(&native, &keys).map_err(fixture_err)?;
    let params = weights.params(&keys).map_err(fixture_err)?;
    let input = golden.matrix("input")?;
    let grad_output = golden.matrix("grad_output")?;
    let expected_out = golden.matrix("output")?;
    let expected_grad_in = golden.matrix("grad_input")?;
    let golden_grads: Vec<&String> = {
        let mut k: Vec<&String> = golden
            .tensors
            .keys()
            .filter(|k| k.starts_with("grad."))
            .collect();
        k.sort();
        k
    };

    let paths: [(&str, Forward, Backward); 2] = [
        (
            "reference",
            moe_kernels::reference::moe_forward::<f32>,
            moe_kernels::reference::moe_backward::<f32>,
        ),
        (
            "fast",
            moe_kernels::fast::moe_forward,
            moe_kernels::fast::moe_backward,
        ),
    ];
    let mut checks = Vec::new();
    for (path, forward, backward) in paths {
        let tag = format!("{label}: layer {layer} {path}");
        let fwd = forward(input.view(), &params, &cfg)?;
        checks.push(compare_check(
            format!("{tag} output"),
            fwd.output.view(),
            expected_out.view(),
            tol,
        ));
        let grads = backward(input.view(), &params, &cfg, &fwd, grad_output.view())?;
        checks.push(compare_check(
            format!("{tag} grad_input"),
            grads.grad_input.view(),
            expected_grad_in.view(),
            tol,
        ));
        let hf = adapter.to_hf(&grads_by_native_key(&grads, &keys).map_err(fixture_err)?)?;
        for gk in &golden_grads {
            let key = &gk["grad.".len()..];
            let name = format!("{tag} {gk}");
            let Some(t) = hf.get(key) else {
                checks.push(Check::fail(name, "no gradient computed for this HF key"));
                continue;
            };
            let (shape, data) = &golden.tensors[*gk];
            if &t.shape != shape {
                checks.push(Check::fail(
                    name,
                    format!("shape {:?} != golden {:?}", t.shape, shape),
                ));
                continue;
            }
            let got = as_matrix(&t.shape, t.to_f32_vec()?).map_err(fixture_err)?;
            let want = as_matrix(shape, data.clone()).map_err(fixture_err)?;
            checks.push(compare_check(name, got.view(), want.view(), tol));
        }
        let extra: Vec<&String> = hf
            .keys()
            .filter(|k| !golden.tensors.contains_key(&format!("grad.{k}")))
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
