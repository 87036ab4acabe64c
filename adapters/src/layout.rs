//! The expert-tensor plan of one MoE layer: each native grouped tensor (`gate_and_up_projs`
//! [E, H, 2I], `down_projs` [E, I, H], GPT-OSS `gate_up_proj_bias` [E, 2I] / `down_proj_bias` [E, H])
//! is described as SEGMENTS of its last dim, each taken from one HF disk tensor, with the disk
//! column of native column `c` = `col0 + step * c` and an optional transpose. Every family's layout
//! is a table of segments (see [`DiskLayout`]); reading, writing and local shards all go through the
//! same three functions, so a dim permutation always moves the indices and placements with it.
//!
//! Element formulas (README "Native grouped layout"): per-expert `native[e, a, c] = disk_e[c', a]` (transposed) or
//! `disk_e[a, c']`; stacked `native[e, a, c] = disk[e, c', a]` / `disk[e, a, c']`; 2-D biases
//! `native[e, c] = disk[e, c']`.

use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::local::{map_placements, LocalTensor};
use crate::tensor::{dtype_size, HostTensor};
use crate::transpose::{transpose, Mat};
use placement::{IndexSet, Placement};
use safetensors::Dtype;

/// The on-disk expert layout of a checkpoint (detected from its keys and shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskLayout {
    /// `experts.e.{gate,up,down}` Linear weights: gate/up [I, H], down [H, I].
    PerExpert,
    /// transformers v5 fused: `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I].
    FusedTransposed,
    /// fused in native orientation (published Qwen3-VL-MoE): [E, H, 2I], [E, I, H].
    FusedNative,
    /// GPT-OSS: `gate_up_proj` [E, H, 2I] interleaved, biases, `down_proj` [E, I, H].
    GptOss,
    /// Step3.5: `moe.{gate,up}_proj.weight` [E, I, H], `moe.down_proj.weight` [E, H, I].
    Step35,
}

/// Which native tensor of a MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NativeKind {
    /// `mlp.experts.gate_and_up_projs` [E, H, 2I].
    GateUp,
    /// `mlp.experts.down_projs` [E, I, H].
    Down,
    /// `mlp.experts.gate_up_proj_bias` [E, 2I] (GPT-OSS).
    GateUpBias,
    /// `mlp.experts.down_proj_bias` [E, H] (GPT-OSS).
    DownBias,
}

impl NativeKind {
    /// The key suffix after `<L>.mlp.experts.`.
    pub fn suffix(self) -> &'static str {
        match self {
            NativeKind::GateUp => "gate_and_up_projs",
            NativeKind::Down => "down_projs",
            NativeKind::GateUpBias => "gate_up_proj_bias",
            NativeKind::DownBias => "down_proj_bias",
        }
    }
}

/// One HF disk tensor feeding a native group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTensor {
    /// The key; for per-expert tensors it contains `{e}` where the expert index goes.
    pub key: String,
    /// One tensor per expert (the expert dim is in the key) or one stacked tensor.
    pub per_expert: bool,
    /// Shape of one disk tensor (per expert when `per_expert`).
    pub shape: Vec<usize>,
    /// Disk orientation is the native one with the last two dims swapped.
    pub transposed: bool,
}

impl DiskTensor {
    /// The key of expert `e` (or the stacked key).
    pub fn key_for(&self, e: usize) -> String {
        if self.per_expert {
            self.key.replace("{e}", &e.to_string())
        } else {
            self.key.clone()
        }
    }
    /// Index of the disk dim holding the native last dim.
    fn col_dim(&self) -> usize {
        let nd = self.shape.len();
        if self.transposed {
            nd - 2
        } else {
            nd - 1
        }
    }
    /// Disk dim of each native dim (`None`: the expert dim, consumed by a per-expert key).
    pub fn dim_map(&self, native_rank: usize) -> Vec<Option<usize>> {
        let off = usize::from(!self.per_expert);
        let mut m: Vec<Option<usize>> = Vec::with_capacity(native_rank);
        m.push(if self.per_expert { None } else { Some(0) });
        for d in 1..native_rank {
            let disk = d - 1 + off;
            m.push(Some(disk));
        }
        if self.transposed && native_rank >= 3 {
            let last = m.len() - 1;
            m.swap(last - 1, last);
        }
        m
    }
    /// Disk index lists for native index lists `idx` (expert list dropped when per-expert) with
    /// the native last dim replaced by `cols`.
    fn disk_indices(&self, idx: &[Vec<usize>], cols: Vec<usize>) -> Vec<Vec<usize>> {
        let mut v: Vec<Vec<usize>> = Vec::new();
        let start = usize::from(self.per_expert);
        let last = idx.len() - 1;
        for d in idx.iter().take(last).skip(start) {
            v.push(d.clone());
        }
        v.push(cols);
        if self.transposed && v.len() >= 2 {
            let last = v.len() - 1;
            v.swap(last - 1, last);
        }
        v
    }
}

/// A run of native last-dim columns `[start, start + len)` read from `disk[src]` at disk columns
/// `col0 + step * (c - start)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index into [`Group::disk`].
    pub src: usize,
    /// First native column.
    pub start: usize,
    /// Number of native columns.
    pub len: usize,
    /// Disk column of the first native column.
    pub col0: usize,
    /// Disk column stride.
    pub step: usize,
}

/// One native expert tensor of one layer and where its bytes live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Layer index.
    pub layer: usize,
    /// Which tensor.
    pub kind: NativeKind,
    /// Native key.
    pub native_key: String,
    /// Native global shape.
    pub shape: Vec<usize>,
    /// Disk tensors it is made of.
    pub disk: Vec<DiskTensor>,
    /// Segments of the native last dim, ascending `start`, covering it exactly.
    pub segs: Vec<Segment>,
}

fn range(n: usize) -> Vec<usize> {
    (0..n).collect()
}

fn seg(src: usize, start: usize, len: usize, col0: usize, step: usize) -> Segment {
    Segment {
        src,
        start,
        len,
        col0,
        step,
    }
}

/// The groups of one MoE layer. `p` is the layer's disk prefix (`model.layers.3`), `np` the native
/// one (the same), `m` the disk MoE module name, `names` the per-expert gate/up/down file names.
pub fn layer_groups(
    layout: DiskLayout,
    l: usize,
    p: &str,
    m: &str,
    names: [&str; 3],
    (e, h, i): (usize, usize, usize),
) -> Vec<Group> {
    let nk = |k: NativeKind| format!("{p}.mlp.experts.{}", k.suffix());
    let dt = |key: String, per_expert: bool, shape: Vec<usize>, transposed: bool| DiskTensor {
        key,
        per_expert,
        shape,
        transposed,
    };
    let g =
        |kind: NativeKind, shape: Vec<usize>, disk: Vec<DiskTensor>, segs: Vec<Segment>| Group {
            layer: l,
            kind,
            native_key: nk(kind),
            shape,
            disk,
            segs,
        };
    let (gu_shape, dn_shape) = (vec![e, h, 2 * i], vec![e, i, h]);
    let split = vec![seg(0, 0, i, 0, 1), seg(1, i, i, 0, 1)];
    match layout {
        DiskLayout::PerExpert => vec![
            g(
                NativeKind::GateUp,
                gu_shape,
                vec![
                    dt(
                        format!("{p}.{m}.experts.{{e}}.{}", names[0]),
                        true,
                        vec![i, h],
                        true,
                    ),
                    dt(
                        format!("{p}.{m}.experts.{{e}}.{}", names[1]),
                        true,
                        vec![i, h],
                        true,
                    ),
                ],
                split,
            ),
            g(
                NativeKind::Down,
                dn_shape,
                vec![dt(
                    format!("{p}.{m}.experts.{{e}}.{}", names[2]),
                    true,
                    vec![h, i],
                    true,
                )],
                vec![seg(0, 0, h, 0, 1)],
            ),
        ],
        DiskLayout::FusedTransposed | DiskLayout::FusedNative => {
            let t = layout == DiskLayout::FusedTransposed;
            let (gs, ds) = if t {
                (vec![e, 2 * i, h], vec![e, h, i])
            } else {
                (gu_shape.clone(), dn_shape.clone())
            };
            vec![
                g(
                    NativeKind::GateUp,
                    gu_shape,
                    vec![dt(format!("{p}.{m}.experts.gate_up_proj"), false, gs, t)],
                    vec![seg(0, 0, 2 * i, 0, 1)],
                ),
                g(
                    NativeKind::Down,
                    dn_shape,
                    vec![dt(format!("{p}.{m}.experts.down_proj"), false, ds, t)],
                    vec![seg(0, 0, h, 0, 1)],
                ),
            ]
        }
        DiskLayout::GptOss => {
            let inter = vec![seg(0, 0, i, 0, 2), seg(0, i, i, 1, 2)];
            vec![
                g(
                    NativeKind::GateUp,
                    gu_shape.clone(),
                    vec![dt(
                        format!("{p}.{m}.experts.gate_up_proj"),
                        false,
                        gu_shape,
                        false,
                    )],
                    inter.clone(),
                ),
                g(
                    NativeKind::Down,
                    dn_shape.clone(),
                    vec![dt(
                        format!("{p}.{m}.experts.down_proj"),
                        false,
                        dn_shape,
                        false,
                    )],
                    vec![seg(0, 0, h, 0, 1)],
                ),
                g(
                    NativeKind::GateUpBias,
                    vec![e, 2 * i],
                    vec![dt(
                        format!("{p}.{m}.experts.gate_up_proj_bias"),
                        false,
                        vec![e, 2 * i],
                        false,
                    )],
                    inter,
                ),
                g(
                    NativeKind::DownBias,
                    vec![e, h],
                    vec![dt(
                        format!("{p}.{m}.experts.down_proj_bias"),
                        false,
                        vec![e, h],
                        false,
                    )],
                    vec![seg(0, 0, h, 0, 1)],
                ),
            ]
        }
        DiskLayout::Step35 => vec![
            g(
                NativeKind::GateUp,
                gu_shape,
                vec![
                    dt(
                        format!("{p}.{m}.gate_proj.weight"),
                        false,
                        vec![e, i, h],
                        true,
                    ),
                    dt(
                        format!("{p}.{m}.up_proj.weight"),
                        false,
                        vec![e, i, h],
                        true,
                    ),
                ],
                split,
            ),
            g(
                NativeKind::Down,
                dn_shape,
                vec![dt(
                    format!("{p}.{m}.down_proj.weight"),
                    false,
                    vec![e, h, i],
                    true,
                )],
                vec![seg(0, 0, h, 0, 1)],
            ),
        ],
    }
}

impl Group {
    /// The segment holding native last-dim column `c` and the disk column it reads.
    fn locate(&self, c: usize) -> Option<(usize, usize)> {
        self.segs
            .iter()
            .find(|s| c >= s.start && c < s.start + s.len)
            .map(|s| (s.src, s.col0 + s.step * (c - s.start)))
    }

    /// Every disk key of this group (per-expert keys expanded over `0..e`).
    pub fn disk_keys(&self, e: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for d in &self.disk {
            if d.per_expert {
                out.extend((0..e).map(|x| (d.key_for(x), d.shape.clone())));
            } else {
                out.push((d.key.clone(), d.shape.clone()));
            }
        }
        out
    }

    /// For local native last-dim columns `cols`: per disk tensor, the local positions it serves and
    /// the disk columns they read. Errors for a column outside the native dim.
    fn split_cols(&self, cols: &[usize]) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
        let mut per: Vec<(Vec<usize>, Vec<usize>)> =
            vec![(Vec::new(), Vec::new()); self.disk.len()];
        for (pos, &c) in cols.iter().enumerate() {
            let (src, dc) = self.locate(c).ok_or_else(|| {
                AdapterError::Shape(format!(
                    "{}: column {c} out of range for native shape {:?}",
                    self.native_key, self.shape
                ))
            })?;
            per[src].0.push(pos);
            per[src].1.push(dc);
        }
        Ok(per)
    }

    /// Builds the native sub-tensor holding global indices `idx` (one list per native dim, in local
    /// order), reading only those bytes from `ckpt`. Errors: not one list per native dim, an
    /// index out of range.
    pub fn read(&self, ckpt: &HfCheckpoint, idx: &[Vec<usize>]) -> Result<HostTensor> {
        if idx.len() != self.shape.len() {
            return Err(AdapterError::Shape(format!(
                "{}: {} index lists for native shape {:?}",
                self.native_key,
                idx.len(),
                self.shape
            )));
        }
        let is_full = idx
            .iter()
            .zip(&self.shape)
            .all(|(v, &n)| v.len() == n && v.iter().enumerate().all(|(i, &x)| i == x));
        if is_full {
            return self.read_whole(ckpt);
        }
        let dtype = ckpt.info(&self.disk[0].key_for(0))?.dtype;
        let out_shape: Vec<usize> = idx.iter().map(Vec::len).collect();
        if out_shape.contains(&0) {
            return HostTensor::new(dtype, out_shape, Vec::new());
        }
        let last = idx.len() - 1;
        let mut pieces = Vec::new();
        let mut order = Vec::new();
        for (src, (pos, dcols)) in self.split_cols(&idx[last])?.into_iter().enumerate() {
            if pos.is_empty() {
                continue;
            }
            let d = &self.disk[src];
            let didx = d.disk_indices(idx, dcols);
            let piece = if d.per_expert {
                let mut parts = Vec::with_capacity(idx[0].len());
                for &e in &idx[0] {
                    let t = ckpt.tensor_gather(&d.key_for(e), &didx)?;
                    parts.push(if d.transposed { t.transpose(0, 1)? } else { t });
                }
                HostTensor::stack(&parts)?
            } else {
                let t = ckpt.tensor_gather(&d.key, &didx)?;
                if d.transposed {
                    let last = t.shape.len() - 1;
                    t.transpose(last - 1, last)?
                } else {
                    t
                }
            };
            pieces.push(piece);
            order.extend(pos);
        }
        let t = match pieces.len() {
            1 => pieces.remove(0),
            _ => HostTensor::cat(&pieces, last)?,
        };
        reorder_last(t, &order)
    }

    /// Whole native tensor -> its HF disk tensors (the inverse of [`Group::read`] on the full range).
    pub fn write(&self, t: &HostTensor) -> Result<Vec<(String, HostTensor)>> {
        if t.shape != self.shape {
            return Err(AdapterError::Shape(format!(
                "native tensor '{}' has shape {:?} but config gives {:?}",
                self.native_key, t.shape, self.shape
            )));
        }
        self.write_experts(&t.data, t.dtype, 0, self.shape[0])
    }

    /// Native bytes of experts `e0..e0 + ne` (row-major [ne, ..native dims]) -> the disk tensors
    /// they make: per-expert keys of those experts, or (stacked layouts, only with all experts)
    /// the stacked tensors. One direct copy per element, no intermediate buffers.
    pub fn write_experts(
        &self,
        native: &[u8],
        dtype: Dtype,
        e0: usize,
        ne: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        let n = dtype_size(dtype)?;
        let (a_len, c_len) = self.inner_dims();
        let block = a_len * c_len * n;
        if native.len() != ne * block || e0 + ne > self.shape[0] {
            return Err(AdapterError::Shape(format!(
                "{}: {} bytes for experts {e0}..{} of native shape {:?} ({dtype})",
                self.native_key,
                native.len(),
                e0 + ne,
                self.shape
            )));
        }
        let mut out = Vec::new();
        for (src, d) in self.disk.iter().enumerate() {
            if !d.per_expert && ne != self.shape[0] {
                return Err(AdapterError::Unsupported(format!(
                    "{}: a stacked disk tensor ({}) needs all experts",
                    self.native_key, d.key
                )));
            }
            let dblock = d.shape[d.col_dim()] * a_len * n;
            if d.per_expert {
                for k in 0..ne {
                    let mut buf = vec![0u8; dblock];
                    self.fill_disk(&native[k * block..(k + 1) * block], n, src, &mut buf)?;
                    out.push((
                        d.key_for(e0 + k),
                        HostTensor::new(dtype, d.shape.clone(), buf)?,
                    ));
                }
            } else {
                let mut buf = vec![0u8; ne * dblock];
                self.fill_disk(native, n, src, &mut buf)?;
                out.push((d.key.clone(), HostTensor::new(dtype, d.shape.clone(), buf)?));
            }
        }
        Ok(out)
    }

    /// Native bytes of consecutive experts (row-major `[k, ..native dims]`, `n`-byte elements)
    /// -> disk tensor `src`'s bytes for those experts (`out`: `k` disk blocks of that tensor;
    /// every byte is written). One direct copy per element.
    pub fn fill_disk(&self, native: &[u8], n: usize, src: usize, out: &mut [u8]) -> Result<()> {
        let (a_len, c_len) = self.inner_dims();
        let block = a_len * c_len * n;
        let d = &self.disk[src];
        let w = d.shape[d.col_dim()];
        let dblock = w * a_len * n;
        let count = native.len().checked_div(block).unwrap_or(0);
        if native.len() != count * block || out.len() != count * dblock {
            return Err(AdapterError::Shape(format!(
                "{}: {} native bytes -> {} bytes of '{}' do not match whole experts",
                self.native_key,
                native.len(),
                out.len(),
                d.key
            )));
        }
        for j in 0..count {
            let nat = &native[j * block..(j + 1) * block];
            let dk = &mut out[j * dblock..(j + 1) * dblock];
            for s in self.segs.iter().filter(|s| s.src == src) {
                let geo = (s, d.transposed, a_len, c_len, w);
                seg_copy_n(n, dk, nat, geo, false)?;
            }
        }
        Ok(())
    }

    /// (A, C): the native dims after the expert dim ([E, A, C]; A = 1 for [E, C] biases).
    fn inner_dims(&self) -> (usize, usize) {
        match self.shape.len() {
            3 => (self.shape[1], self.shape[2]),
            _ => (1, self.shape.last().copied().unwrap_or(0)),
        }
    }

    /// The whole native tensor from the mmapped disk tensors, one direct copy per element.
    fn read_whole(&self, ckpt: &HfCheckpoint) -> Result<HostTensor> {
        let dtype = ckpt.info(&self.disk[0].key_for(0))?.dtype;
        let (a_len, c_len) = self.inner_dims();
        let mut out = vec![0u8; self.shape[0] * a_len * c_len * dtype_size(dtype)?];
        self.fill_whole(ckpt, &mut out)?;
        HostTensor::new(dtype, self.shape.clone(), out)
    }

    /// [`Group::read`] of the whole tensor into `out`, which must have exactly the native
    /// tensor's byte size (every byte is written: the segments cover the last dim). Returns the
    /// dtype.
    pub fn fill_whole(&self, ckpt: &HfCheckpoint, out: &mut [u8]) -> Result<Dtype> {
        self.fill_experts(ckpt, 0, self.shape[0], out)
    }

    /// Experts `e0..e0 + ne` of the native tensor (row-major `[ne, ..native dims]`, a contiguous
    /// byte range of it) into `out`, which must have exactly that size; every byte is written.
    /// One direct copy per element from the mmapped disk tensors. Returns the dtype.
    pub fn fill_experts(
        &self,
        ckpt: &HfCheckpoint,
        e0: usize,
        ne: usize,
        out: &mut [u8],
    ) -> Result<Dtype> {
        let dtype = ckpt.info(&self.disk[0].key_for(0))?.dtype;
        let n = dtype_size(dtype)?;
        let (a_len, c_len) = self.inner_dims();
        let block = a_len * c_len * n;
        if out.len() != ne * block || e0 + ne > self.shape[0] {
            return Err(AdapterError::Shape(format!(
                "{}: output buffer of {} bytes for experts {e0}..{} of native shape {:?} ({dtype})",
                self.native_key,
                out.len(),
                e0 + ne,
                self.shape
            )));
        }
        for k in e0..e0 + ne {
            let nat = &mut out[(k - e0) * block..(k - e0 + 1) * block];
            for (src, d) in self.disk.iter().enumerate() {
                let w = d.shape[d.col_dim()];
                let dblock = w * a_len * n;
                let key = d.key_for(k);
                let info = ckpt.info(&key)?;
                if info.dtype != dtype {
                    return Err(AdapterError::Shape(format!(
                        "{}: '{key}' is not {dtype} like '{}'; one native tensor has one dtype (no casting)",
                        self.native_key,
                        self.disk[0].key_for(0)
                    )));
                }
                let bytes = ckpt.tensor_bytes(&key)?;
                let dk = if d.per_expert {
                    bytes
                } else {
                    bytes.get(k * dblock..(k + 1) * dblock).unwrap_or(&[])
                };
                if dk.len() != dblock {
                    return Err(AdapterError::Shape(format!(
                        "{}: '{key}' has {} bytes, expected {} per expert for shape {:?}",
                        self.native_key,
                        bytes.len(),
                        dblock,
                        d.shape
                    )));
                }
                for s in self.segs.iter().filter(|s| s.src == src) {
                    let geo = (s, d.transposed, a_len, c_len, w);
                    seg_copy_n(n, nat, dk, geo, true)?;
                }
            }
        }
        Ok(dtype)
    }

    /// Bytes of one expert of the native tensor for `dtype`, and of one expert of disk tensor
    /// `src` (its per-expert tensor, or its expert slice when stacked).
    pub fn expert_bytes(&self, dtype: Dtype, src: usize) -> Result<(usize, usize)> {
        let n = dtype_size(dtype)?;
        let (a_len, c_len) = self.inner_dims();
        let d = &self.disk[src];
        Ok((a_len * c_len * n, d.shape[d.col_dim()] * a_len * n))
    }

    /// A native local shard -> the HF disk pieces it covers, indices and placements moved through
    /// every permutation (see the module docs of [`crate::family_adapter`] for the placement rules).
    pub fn to_disk_local(&self, lt: &LocalTensor) -> Result<Vec<LocalTensor>> {
        let nd = self.shape.len();
        let idx: Vec<Vec<usize>> = lt.indices.iter().map(IndexSet::to_vec).collect();
        let last = nd - 1;
        let mut out = Vec::new();
        for (src, (pos, dcols)) in self.split_cols(&idx[last])?.into_iter().enumerate() {
            if pos.is_empty() {
                continue;
            }
            // Disk columns ascending (GPT-OSS interleaves gate and up in one disk tensor).
            let mut pairs: Vec<(usize, usize)> = dcols.into_iter().zip(pos).collect();
            pairs.sort_unstable();
            let (dcols, pos): (Vec<usize>, Vec<usize>) = pairs.into_iter().unzip();
            let d = &self.disk[src];
            let mut sel: Vec<Vec<usize>> = lt.tensor.shape.iter().map(|&n| range(n)).collect();
            sel[last] = pos;
            let slab = lt.tensor.gather_vecs(&sel)?;
            let dset = IndexSet::from_indices(&dcols);
            let placements = self.disk_placements(lt, d, src, &dset)?;
            let mut dind: Vec<IndexSet> = Vec::new();
            let start = usize::from(d.per_expert);
            for s in lt.indices.iter().take(last).skip(start) {
                dind.push(s.clone());
            }
            dind.push(dset);
            if d.transposed && dind.len() >= 2 {
                let n = dind.len();
                dind.swap(n - 1, n - 2);
            }
            if d.per_expert {
                for (k, &e) in idx[0].iter().enumerate() {
                    let x = slab.select(0, k)?;
                    out.push((
                        k,
                        LocalTensor {
                            key: d.key_for(e),
                            tensor: if d.transposed { x.transpose(0, 1)? } else { x },
                            global_shape: d.shape.clone(),
                            placements: placements.clone(),
                            indices: dind.clone(),
                        },
                    ));
                }
            } else {
                let last = slab.shape.len() - 1;
                out.push((
                    0,
                    LocalTensor {
                        key: d.key.clone(),
                        tensor: if d.transposed {
                            slab.transpose(last - 1, last)?
                        } else {
                            slab
                        },
                        global_shape: d.shape.clone(),
                        placements,
                        indices: dind,
                    },
                ));
            }
        }
        // Per-expert keys come expert by expert (gate, up of expert e, then e + 1); stable sort.
        out.sort_by_key(|(k, _)| *k);
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }

    /// Placements of the disk piece `d` (index `src`) of a native local shard, whose native
    /// last-dim columns land on disk columns `dset` (ascending). The expert dim of a per-expert key
    /// is consumed (its mesh dims become `R`); the other dims follow `dim_map`. A mesh dim sharding
    /// the native last dim maps to the disk column dim where the conversion has a DTensor
    /// placement (the one torch's view rules give, `placement::view_placements`):
    /// - the group has one identity segment: any `S` / `_S` moves as is (exact);
    /// - the only mesh dim sharding it is `_S(d, n)` with n = the number of equal segments and
    ///   this disk tensor is fed by one whole segment (TP-packed gate|up, per-expert or stacked
    ///   gate and up tensors: rank r holds chunk r of gate and of up): `S` of the disk column dim,
    ///   exact on every mesh;
    /// - the only mesh dim sharding it is `_S(d, n)` and this disk tensor INTERLEAVES the n
    ///   segments (GPT-OSS `gate_up_proj`: gate col i at 2i, up col i at 2i + 1): rank r holds
    ///   disk cols `{n i + j : i in chunk_r(L), j < n}`, one run `[n o, n (o + s))`, so `S` of the
    ///   disk column dim (HF `colwise` on the fused dim; torch: `_S(2, 2)` -> view `[.., 2, I]` ->
    ///   `S(3)` -> transpose -> `S(2)` -> flatten -> `S(2)`). Exact when torch.chunk of n L over
    ///   the mesh size k lines up with n times that of L (`ceil(nL / k) == n ceil(L / k)`, e.g. k
    ///   divides L = I). Otherwise torch refuses that flatten ("cannot flatten unevenly sharded
    ///   tensor") and no placement gives every rank's run; a shard does not know k, so the piece
    ///   still says `S(col)` and its index sets (always exact) are authoritative: check with
    ///   [`LocalTensor::placements_match`]. Error when `dset` is not such a run (the native index
    ///   sets are not those of `_S(d, n)`).
    ///
    /// Anything else (e.g. plain `S(2)` on [gate|up], or two mesh dims sharding the packed dim) is
    /// an "unsupported in this version" error.
    fn disk_placements(
        &self,
        lt: &LocalTensor,
        d: &DiskTensor,
        src: usize,
        dset: &IndexSet,
    ) -> Result<Vec<Placement>> {
        let nd = self.shape.len();
        let last = nd - 1;
        let dim_map = d.dim_map(nd);
        let nseg = self.segs.len();
        // The segments of each disk tensor cover its columns exactly once (the layout tables of
        // `layer_groups`), so one segment is the whole tensor, and one segment of the native
        // tensor is the identity map.
        let identity = nseg == 1;
        let mine: Vec<&Segment> = self.segs.iter().filter(|s| s.src == src).collect();
        let equal = self.segs.iter().all(|s| s.len == self.segs[0].len);
        // All n > 1 segments in this one tensor: they are interleaved (the tables again), segment
        // j (native cols [j L, (j + 1) L)) at disk cols j, j + n, ...
        let interleaved = mine.len() == nseg;
        let packed_dims = lt
            .placements
            .iter()
            .filter(|p| p.shard_dim() == Some(last))
            .count();
        let mut out = Vec::with_capacity(lt.placements.len());
        for p in &lt.placements {
            if p.shard_dim() != Some(last) {
                out.extend(map_placements(std::slice::from_ref(p), &dim_map)?);
                continue;
            }
            let col = dim_map[last].unwrap_or(0);
            let packed = matches!(p, Placement::StridedShard { split_factor, .. }
                if *split_factor == nseg && equal && packed_dims == 1);
            let q = match p {
                _ if identity => Some(p.with_shard_dim(col)),
                _ if packed && mine.len() == 1 => Some(Placement::Shard(col)),
                _ if packed && interleaved => {
                    // (a rank holding no column gets no piece, so `dset` is not empty)
                    let run =
                        matches!(dset.runs(), [r] if r.start % nseg == 0 && r.len() % nseg == 0);
                    if !run {
                        return Err(AdapterError::Placement(format!(
                            "{}: placement {p} but the native columns held land on {} columns {:?} (not one run of whole gate/up pairs): the index sets are not those of {p}",
                            self.native_key,
                            d.key,
                            dset.runs()
                        )));
                    }
                    Some(Placement::Shard(col))
                }
                _ => None,
            };
            match q {
                Some(q) => out.push(q),
                None => {
                    return Err(AdapterError::Unsupported(format!(
                        "{}: placement {p} shards the packed last dim ({} segments from {}), which has no placement on the HF tensor; unsupported in this version (use _S({last}, {}) alone on that dim)",
                        self.native_key,
                        nseg,
                        d.key,
                        nseg
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// Segment geometry: (segment, transposed, A, C, W).
type Geo<'a> = (&'a Segment, bool, usize, usize, usize);

/// [`seg_copy`] for `n`-byte elements (every safetensors dtype this crate reads is 1, 2, 4 or 8
/// bytes; `crate::tensor::dtype_size`). Error: any other size.
fn seg_copy_n(n: usize, dst: &mut [u8], src: &[u8], geo: Geo<'_>, to_native: bool) -> Result<()> {
    match n {
        1 => seg_copy::<1>(dst, src, geo, to_native),
        2 => seg_copy::<2>(dst, src, geo, to_native),
        4 => seg_copy::<4>(dst, src, geo, to_native),
        8 => seg_copy::<8>(dst, src, geo, to_native),
        _ => {
            return Err(AdapterError::Unsupported(format!(
                "{n}-byte elements (layouts copy 1-, 2-, 4- and 8-byte elements)"
            )))
        }
    }
    Ok(())
}

/// Copies one segment between an expert's native block and its disk block with N-byte elements:
/// `dst` is the native block when `to_native`, else the disk block (`src` the other one).
/// Same element pairs as [`for_seg_pairs`], with slice iteration on the contiguous side.
fn seg_copy<const N: usize>(dst: &mut [u8], src: &[u8], geo: Geo<'_>, to_native: bool) {
    let (s, transposed, a_len, c_len, w) = geo;
    if transposed {
        // native [A, C] at (a, start + c) <-> disk [W, A] at (col0 + step c, a)
        let nat = Mat {
            offset: s.start,
            stride: c_len,
        };
        let disk = Mat {
            offset: s.col0 * a_len,
            stride: s.step * a_len,
        };
        if to_native {
            transpose(dst, nat, src, disk, s.len, a_len, N);
        } else {
            transpose(dst, disk, src, nat, a_len, s.len, N);
        }
    } else if s.step == 1 {
        for a in 0..a_len {
            let no = (a * c_len + s.start) * N;
            let dof = (a * w + s.col0) * N;
            let n = s.len * N;
            if to_native {
                dst[no..no + n].copy_from_slice(&src[dof..dof + n]);
            } else {
                dst[dof..dof + n].copy_from_slice(&src[no..no + n]);
            }
        }
    } else if to_native {
        for_seg_pairs(s, transposed, a_len, c_len, w, |no, dof| {
            dst[no * N..no * N + N].copy_from_slice(&src[dof * N..dof * N + N]);
        });
    } else {
        for_seg_pairs(s, transposed, a_len, c_len, w, |no, dof| {
            dst[dof * N..dof * N + N].copy_from_slice(&src[no * N..no * N + N]);
        });
    }
}

/// Calls `f(native offset, disk offset)` (in elements, within one expert) for every element of
/// segment `s`: native [A, C] at (a, start + c) <-> disk [W, A] at (col0 + step c, a) when
/// `transposed`, else disk [A, W] at (a, col0 + step c). Tiled so both sides stay in cache.
fn for_seg_pairs(
    s: &Segment,
    transposed: bool,
    a_len: usize,
    c_len: usize,
    w: usize,
    mut f: impl FnMut(usize, usize),
) {
    const T: usize = 32;
    if transposed {
        for c0 in (0..s.len).step_by(T) {
            for a0 in (0..a_len).step_by(T) {
                for c in c0..(c0 + T).min(s.len) {
                    let drow = (s.col0 + s.step * c) * a_len;
                    for a in a0..(a0 + T).min(a_len) {
                        f(a * c_len + s.start + c, drow + a);
                    }
                }
            }
        }
    } else {
        for a in 0..a_len {
            for c in 0..s.len {
                f(a * c_len + s.start + c, a * w + s.col0 + s.step * c);
            }
        }
    }
}

/// `t`'s last dim holds local positions `order[q]` at column q; returns it in position order.
fn reorder_last(t: HostTensor, order: &[usize]) -> Result<HostTensor> {
    if order.iter().enumerate().all(|(q, &p)| q == p) {
        return Ok(t);
    }
    let mut inv = vec![0usize; order.len()];
    for (q, &p) in order.iter().enumerate() {
        inv[p] = q;
    }
    let mut sel: Vec<Vec<usize>> = t.shape.iter().map(|&n| range(n)).collect();
    let last = sel.len() - 1;
    sel[last] = inv;
    t.gather_vecs(&sel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// `seg_copy` (slice copies, the blocked transpose) moves exactly the element pairs
        /// `for_seg_pairs` enumerates, one element at a time, for any segment geometry (not only
        /// those of the layout tables: any column offset, stride, width, transposed or not), both
        /// ways, for every element size.
        #[test]
        fn seg_copy_moves_the_pairs_of_for_seg_pairs(
            a_len in 1usize..6, c_extra in 0usize..4, len in 1usize..6, start in 0usize..3,
            col0 in 0usize..4, step in 1usize..4, w_extra in 0usize..3, transposed in any::<bool>(),
            n in prop::sample::select(vec![1usize, 2, 4, 8]), to_native in any::<bool>(), seed in any::<u8>(),
        ) {
            let c_len = start + len + c_extra;
            let w = col0 + step * (len - 1) + 1 + w_extra;
            let s = Segment { src: 0, start, len, col0, step };
            let (nat_bytes, disk_bytes) = (a_len * c_len * n, w * a_len * n);
            let (src_len, dst_len) = if to_native { (disk_bytes, nat_bytes) } else { (nat_bytes, disk_bytes) };
            let src: Vec<u8> = (0..src_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let mut got = vec![0u8; dst_len];
            seg_copy_n(n, &mut got, &src, (&s, transposed, a_len, c_len, w), to_native).unwrap();
            let mut want = vec![0u8; dst_len];
            for_seg_pairs(&s, transposed, a_len, c_len, w, |no, dof| {
                let (d, f) = if to_native { (no, dof) } else { (dof, no) };
                want[d * n..d * n + n].copy_from_slice(&src[f * n..f * n + n]);
            });
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn another_element_size_is_an_error() {
        let s = Segment {
            src: 0,
            start: 0,
            len: 1,
            col0: 0,
            step: 1,
        };
        let e = seg_copy_n(3, &mut [0; 3], &[0; 3], (&s, false, 1, 1, 1), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "3-byte elements (layouts copy 1-, 2-, 4- and 8-byte elements)"
        );
    }
}
