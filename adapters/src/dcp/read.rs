//! Reshard on read: any rank's shard for any mesh and placements, assembled from the saved chunks
//! that overlap it, reading only those bytes from the memory-mapped files (memory: the output).
//!
//! Per tensor dim, the wanted global indices (a [`placement::IndexSet`] in local order) meet a
//! chunk's index range `[offset, offset + size)` in segments `(dst_pos, src_pos, len)`. Trailing
//! dims that both sides hold whole are merged into the innermost copied run, so a chunk saved
//! row-major is copied in runs as long as the overlap allows (the whole chunk at once when the
//! output is a plain concatenation of chunks on dim 0). A chunk stored with other strides (a
//! transposed or sliced view saved by `torch.save`) is copied element by element.

use super::{Chunk, DcpCheckpoint, Layout};
use crate::error::{AdapterError, Result};
use crate::local::shard_indices;
use crate::tensor::{dtype_size, HostTensor};
use placement::{format_placements, DeviceMesh, IndexSet, Placement};

/// Per dim: `(dst_pos, src_pos, len)` where the wanted set and `[off, off + size)` meet.
fn segments(want: &IndexSet, off: usize, size: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for r in want.runs() {
        let lo = r.start.max(off);
        let hi = r.end.min(off + size);
        if lo < hi {
            out.push((pos + lo - r.start, lo - off, hi - lo));
        }
        pos += r.end - r.start;
    }
    out
}

/// Copies into `out` (row-major, shape = lengths of `want`) the elements of chunk `c` (with
/// layout `l`, data in `src`) that `want` selects; returns how many elements were copied.
fn copy_chunk(
    out: &mut [u8],
    want: &[IndexSet],
    c: &Chunk,
    l: &Layout,
    src: &[u8],
    elem: usize,
) -> usize {
    let nd = want.len();
    if nd == 0 {
        let a = l.data_start + l.storage_offset * elem;
        out[..elem].copy_from_slice(&src[a..a + elem]);
        return 1;
    }
    let segs: Vec<Vec<(usize, usize, usize)>> = (0..nd)
        .map(|d| segments(&want[d], c.boxed.offsets[d], c.boxed.sizes[d]))
        .collect();
    if segs.iter().any(Vec::is_empty) {
        return 0;
    }
    let out_shape: Vec<usize> = want.iter().map(IndexSet::len).collect();
    let mut dst_st = vec![1usize; nd];
    for d in (0..nd - 1).rev() {
        dst_st[d] = dst_st[d + 1] * out_shape[d + 1];
    }
    // Trailing dims held whole by both sides, stored row-major in the chunk, merge into `inner`.
    let mut inner = 1usize;
    let mut k = nd; // dims k.. are merged
    while k > 0 {
        let d = k - 1;
        let whole = segs[d].len() == 1
            && segs[d][0] == (0, 0, out_shape[d])
            && out_shape[d] == c.boxed.sizes[d];
        if !(whole && l.strides[d] == inner) {
            break;
        }
        inner *= out_shape[d];
        k -= 1;
    }
    let base = l.data_start + l.storage_offset * elem;
    let mut copied = 0usize;
    if k == 0 {
        let n = inner * elem;
        out[..n].copy_from_slice(&src[base..base + n]);
        return inner;
    }
    let j = k - 1; // innermost dim copied in runs (contiguous when its stride is `inner`)
    let contiguous = l.strides[j] == inner;
    // Every (dst, src) index pair of the outer dims 0..j, then the runs of dim j.
    let outer: Vec<Vec<(usize, usize)>> = segs[..j]
        .iter()
        .map(|v| {
            v.iter()
                .flat_map(|&(t, s, n)| (0..n).map(move |q| (t + q, s + q)))
                .collect()
        })
        .collect();
    let mut ix = vec![0usize; j];
    if outer.iter().any(Vec::is_empty) {
        return 0;
    }
    loop {
        let (mut db, mut sb) = (0usize, 0usize);
        for (d, &q) in ix.iter().enumerate() {
            let (t, s) = outer[d][q];
            db += t * dst_st[d];
            sb += s * l.strides[d];
        }
        for &(t, s, n) in &segs[j] {
            let dst = (db + t * dst_st[j]) * elem;
            if contiguous {
                let a = base + (sb + s * inner) * elem;
                let len = n * inner * elem;
                out[dst..dst + len].copy_from_slice(&src[a..a + len]);
            } else {
                copy_strided(
                    &mut out[dst..],
                    src,
                    base + (sb + s * l.strides[j]) * elem,
                    n,
                    l.strides[j],
                    &out_shape[k..],
                    &l.strides[k..],
                    elem,
                );
            }
            copied += n * inner;
        }
        // Odometer over the outer dims, last fastest.
        let mut d = j;
        loop {
            if d == 0 {
                return copied;
            }
            d -= 1;
            ix[d] += 1;
            if ix[d] < outer[d].len() {
                break;
            }
            ix[d] = 0;
        }
    }
}

/// Element-wise copy of `n` slices (stride `step` elements apart in `src`) each of the row-major
/// block `block` (strides `bst` in `src`) into `dst` contiguously. `at` is the byte offset of the
/// first element in `src`.
#[allow(clippy::too_many_arguments)]
fn copy_strided(
    dst: &mut [u8],
    src: &[u8],
    at: usize,
    n: usize,
    step: usize,
    block: &[usize],
    bst: &[usize],
    elem: usize,
) {
    let per: usize = block.iter().product();
    let mut o = 0usize;
    let mut ix = vec![0usize; block.len()];
    for q in 0..n {
        for _ in 0..per {
            let mut s = q * step;
            for (&i, &st) in ix.iter().zip(bst) {
                s += i * st;
            }
            let a = at + s * elem;
            dst[o..o + elem].copy_from_slice(&src[a..a + elem]);
            o += elem;
            let mut d = block.len();
            while d > 0 {
                d -= 1;
                ix[d] += 1;
                if ix[d] < block[d] {
                    break;
                }
                ix[d] = 0;
            }
        }
    }
}

impl DcpCheckpoint {
    /// Fills `out` (row-major, shape = the lengths of `want`) with the elements of `key` whose
    /// global indices `want` lists per dim, in that order. `out` must hold exactly that many
    /// elements of the tensor's dtype.
    ///
    /// Errors (naming the key): unknown key; the tensor has a problem ([`DcpCheckpoint::problems`]);
    /// `want` of the wrong rank or reaching outside the global shape; `out` of the wrong size; the
    /// chunks not giving every wanted element (a gap the checks missed).
    pub fn read_into(&self, key: &str, want: &[IndexSet], out: &mut [u8]) -> Result<()> {
        let t = self.entry(key)?;
        let d = self.dir.display();
        if let Some(p) = t.problems.first() {
            return Err(AdapterError::Format(format!(
                "checkpoint {d}: tensor '{key}': {p}"
            )));
        }
        let elem = dtype_size(t.dtype)?;
        let bad_rank = want.len() != t.global_shape.len();
        let outside = want
            .iter()
            .zip(&t.global_shape)
            .any(|(w, &n)| w.runs().iter().any(|r| r.end > n));
        if bad_rank || outside {
            return Err(AdapterError::Shape(format!(
                "checkpoint {d}: tensor '{key}' of global shape {:?}: wanted indices {:?} do not fit",
                t.global_shape,
                want.iter().map(|w| w.runs().to_vec()).collect::<Vec<_>>()
            )));
        }
        let numel: usize = want.iter().map(IndexSet::len).product();
        if out.len() != numel * elem {
            return Err(AdapterError::Tensor(format!(
                "tensor '{key}': output buffer of {} bytes for {numel} elements of {}",
                out.len(),
                t.dtype
            )));
        }
        if numel == 0 {
            return Ok(());
        }
        let mut copied = 0usize;
        for c in &t.chunks {
            let Some(l) = &c.layout else { continue };
            copied += copy_chunk(out, want, c, l, self.file_bytes(c.file), elem);
            if want.is_empty() && copied > 0 {
                break;
            }
        }
        if copied != numel {
            return Err(AdapterError::Format(format!(
                "checkpoint {d}: tensor '{key}': saved chunks gave {copied} of the {numel} wanted elements"
            )));
        }
        Ok(())
    }

    /// Reshard on load: this rank's local tensor of `key` for `placements` on `mesh` (any mesh,
    /// any placements without `Partial`, `_StridedShard` included; `rank` = row-major index in
    /// `mesh`), read from the chunks that overlap it. Shape =
    /// `placement::local_shard(global_shape, mesh, placements, coordinate(rank)).local_shape`, in
    /// that shard's local order; dtype = the saved dtype.
    ///
    /// Errors (naming the key): unknown key; a tensor with a problem; a `Partial` placement;
    /// placements that do not fit the mesh or the tensor; `rank >= mesh.size()`.
    pub fn read_local(
        &self,
        key: &str,
        mesh: &DeviceMesh,
        placements: &[Placement],
        rank: usize,
    ) -> Result<HostTensor> {
        self.read_local_checked(key, None, mesh, placements, rank)
    }

    /// [`DcpCheckpoint::read_local`], first checking the checkpoint's global shape of `key`
    /// against `expect_global_shape` when given (the model's shape, as torch's load planner does:
    /// "Size mismatch"): a mismatch is an error naming the key and both shapes.
    pub fn read_local_checked(
        &self,
        key: &str,
        expect_global_shape: Option<&[usize]>,
        mesh: &DeviceMesh,
        placements: &[Placement],
        rank: usize,
    ) -> Result<HostTensor> {
        let t = self.entry(key)?;
        let gs = &t.global_shape;
        if let Some(want) = expect_global_shape {
            if want != gs.as_slice() {
                return Err(AdapterError::Shape(format!(
                    "checkpoint {}: tensor '{key}' has global shape {gs:?} but {want:?} was expected (size mismatch)",
                    self.dir.display()
                )));
            }
        }
        if let Some(p) = placements.iter().find(|p| p.is_partial()) {
            return Err(AdapterError::Unsupported(format!(
                "tensor '{key}': cannot load into placement {p} of {}: a checkpoint holds full values, not partial terms",
                format_placements(placements)
            )));
        }
        let coord = mesh
            .coordinate(rank)
            .map_err(|e| AdapterError::Placement(format!("{key}: rank {rank}: {e}")))?;
        let (ls, want) = shard_indices(key, gs, mesh, placements, &coord)?;
        let elem = dtype_size(t.dtype)?;
        let numel: usize = ls.local_shape.iter().product();
        let mut out = vec![0u8; numel * elem];
        self.read_into(key, &want, &mut out)?;
        HostTensor::new(t.dtype, ls.local_shape, out)
    }

    /// The whole tensor of `key` (= [`DcpCheckpoint::read_local`] on a 1-rank mesh with `R`).
    pub fn read_full(&self, key: &str) -> Result<HostTensor> {
        let mesh =
            DeviceMesh::new(vec![1]).map_err(|e| AdapterError::Placement(format!("{key}: {e}")))?;
        self.read_local(key, &mesh, &[Placement::Replicate], 0)
    }

    /// Checks the CRC-32 of every chunk's storage of `key` against the one its `torch.save`
    /// archive records (torch DCP only; the HF formats record none). Errors name the chunk and
    /// the file.
    pub fn verify_crc(&self, key: &str) -> Result<()> {
        let t = self.entry(key)?;
        let elem = dtype_size(t.dtype)?;
        for (i, c) in t.chunks.iter().enumerate() {
            let Some(l) = &c.layout else { continue };
            let Some(want) = l.crc32 else { continue };
            let src = self.file_bytes(c.file);
            let data = &src[l.data_start..l.data_start + l.storage_numel * elem];
            let got = crc32fast::hash(data);
            if got != want {
                return Err(AdapterError::Format(format!(
                    "{}: tensor '{key}': chunk {i} (offsets {:?}): storage CRC-32 {got:08x} but its archive records {want:08x} (corrupted)",
                    self.dir.join(&self.files[c.file].0).display(),
                    c.boxed.offsets
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::chunks::ChunkBox;

    /// A chunk of `sizes` at `offsets` whose storage (with `strides`, `storage_offset`) is `src`.
    fn chunk(
        offsets: &[usize],
        sizes: &[usize],
        strides: &[usize],
        so: usize,
        n: usize,
    ) -> (Chunk, Layout) {
        let l = Layout {
            data_start: 0,
            storage_offset: so,
            strides: strides.to_vec(),
            storage_numel: n,
            crc32: None,
        };
        let c = Chunk {
            boxed: ChunkBox {
                offsets: offsets.to_vec(),
                sizes: sizes.to_vec(),
            },
            file: 0,
            byte_offset: 0,
            byte_length: 0,
            layout: Some(l.clone()),
        };
        (c, l)
    }

    #[test]
    fn strided_and_offset_chunks_match_the_index_formula() {
        // Global [4, 6]; chunk = rows 1..4, cols 2..6 stored transposed with an offset of 3:
        // element (i, j) of the chunk is storage[3 + i * 1 + j * 3] (strides [1, 3]).
        let storage: Vec<u8> = (0..40).collect();
        let (c, l) = chunk(&[1, 2], &[3, 4], &[1, 3], 3, 40);
        // Want rows {3, 1} (local order), cols {5, 2, 3}.
        let want = [
            IndexSet::from_indices(&[3, 1]),
            IndexSet::from_indices(&[5, 2, 3]),
        ];
        let mut out = vec![0u8; 6];
        let n = copy_chunk(&mut out, &want, &c, &l, &storage, 1);
        assert_eq!(n, 6);
        let f = |gi: usize, gj: usize| storage[3 + (gi - 1) + (gj - 2) * 3];
        assert_eq!(
            out,
            vec![f(3, 5), f(3, 2), f(3, 3), f(1, 5), f(1, 2), f(1, 3)]
        );
        // Row-major chunk, whole rows wanted: one run per row.
        let (c, l) = chunk(&[2, 0], &[2, 6], &[6, 1], 0, 12);
        let src: Vec<u8> = (100..112).collect();
        let want = [IndexSet::full(4), IndexSet::full(6)];
        let mut out = vec![0u8; 24];
        assert_eq!(copy_chunk(&mut out, &want, &c, &l, &src, 1), 12);
        assert_eq!(&out[12..], &src[..]);
        assert!(out[..12].iter().all(|&b| b == 0));
        // A zero stride (broadcast) repeats the storage.
        let (c, l) = chunk(&[0, 0], &[3, 2], &[0, 1], 0, 2);
        let mut out = vec![0u8; 6];
        assert_eq!(
            copy_chunk(
                &mut out,
                &[IndexSet::full(3), IndexSet::full(2)],
                &c,
                &l,
                &[7, 9],
                1
            ),
            6
        );
        assert_eq!(out, vec![7, 9, 7, 9, 7, 9]);
    }
}
