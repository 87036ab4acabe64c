//! [`HostTensor`]: a dense, row-major tensor held as raw little-endian bytes, and the pure data
//! movements the adapters need (permute, stack, cat, select, gather by index sets, assemble).
//!
//! Rule: a format conversion never changes dtype and never does arithmetic on values, so every
//! operation here moves whole elements (`element_size` bytes) and is bit-exact by construction.
//! [`HostTensor::to_f32_vec`] exists only for numeric checks in tests and tools.

use crate::error::{AdapterError, Result};
use placement::IndexSet;
use safetensors::Dtype;

/// Dense row-major tensor of raw little-endian bytes. No arithmetic, no dtype change.
///
/// Invariant (checked by [`HostTensor::new`]): `data.len() == numel * element_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Element type as safetensors names it (`BF16`, `F32`, ...). Sub-byte dtypes are rejected.
    pub dtype: Dtype,
    /// Shape, outermost dim first (row-major / C order).
    pub shape: Vec<usize>,
    /// `numel * element_size` bytes, little-endian elements in row-major order.
    pub data: Vec<u8>,
}

/// Size of one element of `dtype` in bytes; errors for sub-byte dtypes (F4, F6), which cannot be
/// moved element by element.
pub fn dtype_size(dtype: Dtype) -> Result<usize> {
    let bits = dtype.bitsize();
    if bits == 0 || bits % 8 != 0 {
        return Err(AdapterError::Tensor(format!(
            "dtype {dtype} has {bits}-bit elements; only whole-byte dtypes are supported"
        )));
    }
    Ok(bits / 8)
}

/// Product of the dims, with overflow reported as an error.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

/// Row-major strides in elements.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Calls `f` for every multi-index of `shape` in row-major order (once for a 0-d shape, never
/// when a dim is 0).
pub(crate) fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Consecutive runs `(start, len)` of an index list, in list order.
fn runs_of(ix: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in ix {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i => *l += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Gathers from a row-major byte buffer of `shape` the sub-tensor holding indices `idx[d]` of
/// each dim `d`, in the given order. Callers check ranges; this never panics on checked input.
pub(crate) fn gather_bytes(
    data: &[u8],
    shape: &[usize],
    elem: usize,
    idx: &[Vec<usize>],
) -> Vec<u8> {
    let nd = shape.len();
    if nd == 0 {
        return data.to_vec();
    }
    let out_numel: usize = idx.iter().map(Vec::len).product();
    let mut out = Vec::with_capacity(out_numel * elem);
    if out_numel == 0 {
        return out;
    }
    let st = strides(shape);
    let last_runs = runs_of(&idx[nd - 1]);
    let outer: Vec<usize> = idx[..nd - 1].iter().map(Vec::len).collect();
    for_each_index(&outer, |c| {
        let base: usize = c.iter().enumerate().map(|(d, &k)| idx[d][k] * st[d]).sum();
        for &(s, l) in &last_runs {
            let a = (base + s) * elem;
            out.extend_from_slice(&data[a..a + l * elem]);
        }
    });
    out
}

/// Tile edge of [`transpose_last2`] (elements).
const TILE: usize = 32;

/// `data` holds `batch` row-major [r, c] matrices of `elem`-byte elements; returns them transposed
/// ([c, r] each). Bit-exact element moves.
fn transpose_last2(data: &[u8], r: usize, c: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let m = r * c * elem;
    if m == 0 {
        return out;
    }
    for (src, dst) in data.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
        match elem {
            1 => tile_transpose::<1>(src, dst, r, c),
            2 => tile_transpose::<2>(src, dst, r, c),
            4 => tile_transpose::<4>(src, dst, r, c),
            8 => tile_transpose::<8>(src, dst, r, c),
            _ => {
                for i in 0..r {
                    for j in 0..c {
                        let (a, b) = ((i * c + j) * elem, (j * r + i) * elem);
                        dst[b..b + elem].copy_from_slice(&src[a..a + elem]);
                    }
                }
            }
        }
    }
    out
}

/// One [r, c] matrix of N-byte elements -> [c, r], in TILE x TILE blocks (cache friendly).
fn tile_transpose<const N: usize>(src: &[u8], dst: &mut [u8], r: usize, c: usize) {
    for i0 in (0..r).step_by(TILE) {
        let i1 = (i0 + TILE).min(r);
        for j0 in (0..c).step_by(TILE) {
            let j1 = (j0 + TILE).min(c);
            for i in i0..i1 {
                let row = &src[(i * c + j0) * N..(i * c + j1) * N];
                for (dj, e) in row.chunks_exact(N).enumerate() {
                    let b = ((j0 + dj) * r + i) * N;
                    dst[b..b + N].copy_from_slice(e);
                }
            }
        }
    }
}

/// Validates per-dim index lists against `shape`; `what` names the tensor in errors.
pub(crate) fn check_indices(what: &str, shape: &[usize], idx: &[Vec<usize>]) -> Result<()> {
    if idx.len() != shape.len() {
        return Err(AdapterError::Tensor(format!(
            "{what}: {} index sets for a {}-d tensor of shape {shape:?}",
            idx.len(),
            shape.len()
        )));
    }
    for (d, (ix, &n)) in idx.iter().zip(shape).enumerate() {
        if let Some(&bad) = ix.iter().find(|&&i| i >= n) {
            return Err(AdapterError::Tensor(format!(
                "{what}: index {bad} out of range for dim {d} of size {n} (shape {shape:?})"
            )));
        }
    }
    Ok(())
}

impl HostTensor {
    /// Builds a tensor, checking `data.len() == prod(shape) * element_size(dtype)`.
    ///
    /// Errors: sub-byte dtype, byte-count mismatch, shape product overflow.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let elem = dtype_size(dtype)?;
        let want = checked_numel(&shape)
            .and_then(|n| n.checked_mul(elem))
            .ok_or_else(|| {
                AdapterError::Tensor(format!("shape {shape:?} of dtype {dtype} overflows usize"))
            })?;
        if want != data.len() {
            return Err(AdapterError::Tensor(format!(
                "tensor of dtype {dtype} and shape {shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(HostTensor { dtype, shape, data })
    }

    /// Number of elements (`prod(shape)`; 1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes per element (2 for BF16/F16, 4 for F32, ...).
    pub fn element_size(&self) -> usize {
        self.dtype.bitsize() / 8
    }

    /// Swaps dims `d0` and `d1` (like `torch.transpose(d0, d1).contiguous()`), same bytes moved.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<HostTensor> {
        let nd = self.shape.len();
        if d0 >= nd || d1 >= nd {
            return Err(AdapterError::Tensor(format!(
                "transpose({d0}, {d1}) out of range for shape {:?}",
                self.shape
            )));
        }
        let mut perm: Vec<usize> = (0..nd).collect();
        perm.swap(d0, d1);
        self.permute(&perm)
    }

    /// Output dim `i` is input dim `perm[i]` (like `torch.permute(perm).contiguous()`).
    ///
    /// Errors: `perm` is not a permutation of `0..ndim`.
    pub fn permute(&self, perm: &[usize]) -> Result<HostTensor> {
        let nd = self.shape.len();
        let mut seen = vec![false; nd];
        if perm.len() != nd
            || perm
                .iter()
                .any(|&p| p >= nd || std::mem::replace(&mut seen[p], true))
        {
            return Err(AdapterError::Tensor(format!(
                "permute({perm:?}) is not a permutation of the dims of shape {:?}",
                self.shape
            )));
        }
        let elem = self.element_size();
        let in_st = strides(&self.shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let src_st: Vec<usize> = perm.iter().map(|&p| in_st[p]).collect();
        if nd >= 2
            && perm[nd - 1] == nd - 2
            && perm[nd - 2] == nd - 1
            && perm[..nd - 2].iter().enumerate().all(|(i, &p)| i == p)
        {
            // Batched transpose of the last two dims: tiled, fixed-size element copies.
            let (r, c) = (self.shape[nd - 2], self.shape[nd - 1]);
            let data = transpose_last2(&self.data, r, c, elem);
            return HostTensor::new(self.dtype, out_shape, data);
        }
        let mut out = Vec::with_capacity(self.data.len());
        if nd == 0 || self.numel() == 0 {
            out.extend_from_slice(&self.data);
        } else if perm[nd - 1] == nd - 1 {
            // Rows stay contiguous: copy whole rows.
            let row = self.shape[nd - 1] * elem;
            for_each_index(&out_shape[..nd - 1], |c| {
                let off: usize = c.iter().zip(&src_st).map(|(a, b)| a * b).sum::<usize>() * elem;
                out.extend_from_slice(&self.data[off..off + row]);
            });
        } else {
            let last_n = out_shape[nd - 1];
            let last_st = src_st[nd - 1];
            for_each_index(&out_shape[..nd - 1], |c| {
                let base: usize = c.iter().zip(&src_st).map(|(a, b)| a * b).sum();
                for k in 0..last_n {
                    let off = (base + k * last_st) * elem;
                    out.extend_from_slice(&self.data[off..off + elem]);
                }
            });
        }
        HostTensor::new(self.dtype, out_shape, out)
    }

    /// Stacks equal-shape, equal-dtype tensors along a new dim 0: `[n, *shape]`.
    ///
    /// Errors: no parts (the shape would be unknown), dtype or shape mismatch (names the part).
    pub fn stack(parts: &[HostTensor]) -> Result<HostTensor> {
        let first = parts
            .first()
            .ok_or_else(|| AdapterError::Tensor("stack of zero tensors".to_string()))?;
        for (i, p) in parts.iter().enumerate() {
            if p.dtype != first.dtype || p.shape != first.shape {
                return Err(AdapterError::Tensor(format!(
                    "stack: part {i} is {} {:?} but part 0 is {} {:?}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
        }
        let mut shape = vec![parts.len()];
        shape.extend_from_slice(&first.shape);
        let mut data = Vec::with_capacity(first.data.len() * parts.len());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        HostTensor::new(first.dtype, shape, data)
    }

    /// Concatenates along `dim`; all other dims and the dtype must agree.
    pub fn cat(parts: &[HostTensor], dim: usize) -> Result<HostTensor> {
        let first = parts
            .first()
            .ok_or_else(|| AdapterError::Tensor("cat of zero tensors".to_string()))?;
        let nd = first.shape.len();
        if dim >= nd {
            return Err(AdapterError::Tensor(format!(
                "cat: dim {dim} out of range for shape {:?}",
                first.shape
            )));
        }
        for (i, p) in parts.iter().enumerate() {
            let ok = p.dtype == first.dtype
                && p.shape.len() == nd
                && (0..nd).all(|d| d == dim || p.shape[d] == first.shape[d]);
            if !ok {
                return Err(AdapterError::Tensor(format!(
                    "cat on dim {dim}: part {i} is {} {:?} but part 0 is {} {:?}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
        }
        let outer: usize = first.shape[..dim].iter().product();
        let elem = first.element_size();
        let chunk = |p: &HostTensor| p.shape[dim..].iter().product::<usize>() * elem;
        let mut shape = first.shape.clone();
        shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for o in 0..outer {
            for p in parts {
                let c = chunk(p);
                data.extend_from_slice(&p.data[o * c..(o + 1) * c]);
            }
        }
        HostTensor::new(first.dtype, shape, data)
    }

    /// The slice at `index` of `dim`, with that dim removed (like `torch.select`).
    pub fn select(&self, dim: usize, index: usize) -> Result<HostTensor> {
        if dim >= self.shape.len() || index >= self.shape[dim] {
            return Err(AdapterError::Tensor(format!(
                "select(dim={dim}, index={index}) out of range for shape {:?}",
                self.shape
            )));
        }
        let idx: Vec<Vec<usize>> = self
            .shape
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                if d == dim {
                    vec![index]
                } else {
                    (0..n).collect()
                }
            })
            .collect();
        let data = gather_bytes(&self.data, &self.shape, self.element_size(), &idx);
        let mut shape = self.shape.clone();
        shape.remove(dim);
        HostTensor::new(self.dtype, shape, data)
    }

    /// Sub-tensor holding, for each dim d, the indices `indices[d]` in that order (gather by index
    /// sets). Output shape is `[indices[0].len(), ..]`.
    ///
    /// Errors: wrong number of index sets, an index out of range.
    pub fn gather(&self, indices: &[IndexSet]) -> Result<HostTensor> {
        let idx: Vec<Vec<usize>> = indices.iter().map(|s| s.to_vec()).collect();
        self.gather_vecs(&idx)
    }

    /// [`HostTensor::gather`] with plain index lists.
    pub fn gather_vecs(&self, idx: &[Vec<usize>]) -> Result<HostTensor> {
        check_indices("gather", &self.shape, idx)?;
        let data = gather_bytes(&self.data, &self.shape, self.element_size(), idx);
        HostTensor::new(self.dtype, idx.iter().map(Vec::len).collect(), data)
    }

    /// Decode to f32 for NUMERIC CHECKS ONLY (F32, F16, BF16, F64); never used by conversions.
    ///
    /// Errors: any other dtype.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let d = &self.data;
        let v = match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            other => {
                return Err(AdapterError::Tensor(format!(
                    "to_f32_vec: dtype {other} is not a float type (F32, F16, BF16, F64)"
                )))
            }
        };
        Ok(v)
    }
}

/// Inverse of gather: builds a global tensor of `global_shape` from shards with their per-dim index
/// sets (`parts[k].0[d]` lists the global indices of dim d that shard k holds, in its local order).
///
/// Errors: dtype or shape disagreement (a shard's shape must be the index-set lengths), an index out
/// of range, an element covered by no shard (names the first such element and the count), or an
/// element covered twice with different bytes. Elements covered twice with equal bytes (replicas)
/// are accepted.
pub fn assemble(
    global_shape: &[usize],
    dtype: Dtype,
    parts: &[(Vec<IndexSet>, HostTensor)],
) -> Result<HostTensor> {
    let elem = dtype_size(dtype)?;
    let numel = checked_numel(global_shape).ok_or_else(|| {
        AdapterError::Tensor(format!("assemble: shape {global_shape:?} overflows"))
    })?;
    let mut data = vec![0u8; numel * elem];
    let mut covered = vec![false; numel];
    let gst = strides(global_shape);
    for (k, (sets, t)) in parts.iter().enumerate() {
        let what = format!("assemble part {k}");
        if t.dtype != dtype {
            return Err(AdapterError::Tensor(format!(
                "{what}: dtype {} but the global tensor is {dtype}",
                t.dtype
            )));
        }
        let idx: Vec<Vec<usize>> = sets.iter().map(|s| s.to_vec()).collect();
        check_indices(&what, global_shape, &idx)?;
        let lens: Vec<usize> = idx.iter().map(Vec::len).collect();
        if lens != t.shape {
            return Err(AdapterError::Tensor(format!(
                "{what}: shard shape {:?} but its index sets have lengths {lens:?}",
                t.shape
            )));
        }
        let mut src = 0usize;
        let mut err: Option<AdapterError> = None;
        for_each_index(&lens, |c| {
            if err.is_some() {
                return;
            }
            let g: usize = c.iter().enumerate().map(|(d, &i)| idx[d][i] * gst[d]).sum();
            let s = &t.data[src * elem..(src + 1) * elem];
            let dst = &mut data[g * elem..(g + 1) * elem];
            if covered[g] {
                if dst != s {
                    let gi: Vec<usize> = c.iter().enumerate().map(|(d, &i)| idx[d][i]).collect();
                    err = Some(AdapterError::Tensor(format!(
                        "{what}: element {gi:?} is covered twice with different bytes"
                    )));
                }
            } else {
                dst.copy_from_slice(s);
                covered[g] = true;
            }
            src += 1;
        });
        if let Some(e) = err {
            return Err(e);
        }
    }
    let missing = covered.iter().filter(|c| !**c).count();
    if let Some(first) = covered.iter().position(|c| !*c) {
        let mut gi = vec![0usize; global_shape.len()];
        let mut r = first;
        for d in 0..global_shape.len() {
            gi[d] = r / gst[d];
            r %= gst[d];
        }
        return Err(AdapterError::Tensor(format!(
            "assemble: element {gi:?} of global shape {global_shape:?} is not covered by any shard ({missing} uncovered)"
        )));
    }
    HostTensor::new(dtype, global_shape.to_vec(), data)
}
