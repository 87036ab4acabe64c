//! [`LocalTensor`]: one rank's row-major shard, and the dim-wise slicing and concatenation the
//! autograd collectives need (a tensor viewed as `[outer, shape[dim], inner]`).

use super::AutogradError;
use crate::dtype::Element;

/// One rank's local tensor: row-major `data` of shape `shape` (`data.len() == prod(shape)`;
/// a zero-size dim gives an empty tensor, e.g. a zero-length shard `[0, H]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalTensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// `prod(shape)`, or `None` on overflow.
fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl<T: Element> LocalTensor<T> {
    /// Wraps `data` as a row-major tensor of `shape`.
    ///
    /// Errors: [`AutogradError::Shape`] if `data.len() != prod(shape)`.
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Result<Self, AutogradError> {
        match numel(&shape) {
            Some(n) if n == data.len() => Ok(LocalTensor { shape, data }),
            _ => Err(AutogradError::Shape {
                op: "LocalTensor::new",
                reason: format!("shape {shape:?} does not hold {} elements", data.len()),
            }),
        }
    }

    /// The empty tensor of shape `[0]`.
    pub fn empty() -> Self {
        LocalTensor {
            shape: vec![0],
            data: Vec::new(),
        }
    }

    /// The shape (row-major, last dim fastest).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// `(outer, shape[dim], inner)`: the products of the dims before and after `dim`.
    ///
    /// Errors: `dim >= ndim`.
    pub(crate) fn split_at_dim(
        &self,
        op: &'static str,
        dim: usize,
    ) -> Result<(usize, usize, usize), AutogradError> {
        if dim >= self.shape.len() {
            return Err(AutogradError::Shape {
                op,
                reason: format!("dim {dim} out of range for shape {:?}", self.shape),
            });
        }
        let outer = self.shape[..dim].iter().product();
        let inner = self.shape[dim + 1..].iter().product();
        Ok((outer, self.shape[dim], inner))
    }

    /// The slice `[start, start + len)` along `dim` (as `torch.narrow`).
    ///
    /// Errors: `dim >= ndim` or the range exceeds `shape[dim]`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self, AutogradError> {
        let (outer, size, inner) = self.split_at_dim("narrow", dim)?;
        let in_range = start
            .checked_add(len)
            .map(|end| end <= size)
            .unwrap_or(false);
        if !in_range {
            return Err(AutogradError::Shape {
                op: "narrow",
                reason: format!(
                    "range {start}..{start}+{len} exceeds size {size} of dim {dim} (shape {:?})",
                    self.shape
                ),
            });
        }
        let mut data = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let base = (o * size + start) * inner;
            data.extend_from_slice(&self.data[base..base + len * inner]);
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Ok(LocalTensor { shape, data })
    }

    /// Concatenation along `dim` (as `torch.cat`). All parts must have the same ndim and agree
    /// on every dim except `dim`.
    ///
    /// Errors: no parts, `dim >= ndim`, or the other dims differ.
    pub fn cat(parts: &[Self], dim: usize) -> Result<Self, AutogradError> {
        let first = parts.first().ok_or_else(|| AutogradError::Shape {
            op: "cat",
            reason: "no tensors to concatenate".into(),
        })?;
        let (outer, _, inner) = first.split_at_dim("cat", dim)?;
        let mut total = 0usize;
        for p in parts {
            let same_rank = p.shape.len() == first.shape.len();
            let same_other = same_rank
                && (0..first.shape.len()).all(|d| d == dim || p.shape[d] == first.shape[d]);
            if !same_other {
                return Err(AutogradError::Shape {
                    op: "cat",
                    reason: format!(
                        "shapes {:?} and {:?} differ outside dim {dim}",
                        first.shape, p.shape
                    ),
                });
            }
            total += p.shape[dim];
        }
        let mut data = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for p in parts {
                let n = p.shape[dim] * inner;
                data.extend_from_slice(&p.data[o * n..(o + 1) * n]);
            }
        }
        let mut shape = first.shape.clone();
        shape[dim] = total;
        Ok(LocalTensor { shape, data })
    }
}

/// Offsets `[0, s0, s0+s1, ...]` (length `sizes.len() + 1`).
pub(crate) fn offsets(sizes: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(sizes.len() + 1);
    let mut acc = 0;
    out.push(0);
    for &s in sizes {
        acc += s;
        out.push(acc);
    }
    out
}

/// Rank-major packing for a collective along `dim`: the blocks `[outer, sizes[r], inner]` of a
/// `[outer, sum(sizes), inner]` buffer, concatenated in rank order.
pub(crate) fn pack_blocks<T: Copy>(
    data: &[T],
    outer: usize,
    sizes: &[usize],
    inner: usize,
) -> Vec<T> {
    let offs = offsets(sizes);
    let total = offs[sizes.len()];
    let mut out = Vec::with_capacity(data.len());
    for (r, &s) in sizes.iter().enumerate() {
        for o in 0..outer {
            let base = (o * total + offs[r]) * inner;
            out.extend_from_slice(&data[base..base + s * inner]);
        }
    }
    out
}

/// Inverse of [`pack_blocks`]: rank-major blocks back to a `[outer, sum(sizes), inner]` buffer.
pub(crate) fn unpack_blocks<T: Copy>(
    blocks: &[T],
    outer: usize,
    sizes: &[usize],
    inner: usize,
) -> Vec<T> {
    let offs = offsets(sizes);
    let mut out = Vec::with_capacity(blocks.len());
    for o in 0..outer {
        for (r, &s) in sizes.iter().enumerate() {
            let base = offs[r] * outer * inner + o * s * inner;
            out.extend_from_slice(&blocks[base..base + s * inner]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_cat_round_trip_and_pack_inverse() {
        let x = LocalTensor::new(vec![2, 5, 3], (0..30).map(f64::from).collect()).unwrap();
        let sizes = [2, 0, 3];
        let parts: Vec<_> = offsets(&sizes)
            .windows(2)
            .map(|w| x.narrow(1, w[0], w[1] - w[0]).unwrap())
            .collect();
        assert_eq!(parts[0].data()[..6], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(parts[1].shape(), &[2, 0, 3]);
        assert_eq!(LocalTensor::cat(&parts, 1).unwrap(), x);
        let packed = pack_blocks(x.data(), 2, &sizes, 3);
        let concat: Vec<f64> = parts.iter().flat_map(|p| p.data().to_vec()).collect();
        assert_eq!(packed, concat);
        assert_eq!(unpack_blocks(&packed, 2, &sizes, 3), x.data());
        assert!(x.narrow(1, 4, 2).is_err());
        assert!(LocalTensor::<f64>::new(vec![2, 2], vec![0.0; 3]).is_err());
    }
}
