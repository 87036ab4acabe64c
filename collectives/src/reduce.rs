//! Element-wise reductions over byte buffers, in rank order (threads backend).
//!
//! Inputs are combined left to right (`((in0 op in1) op in2) ...`), so results are
//! deterministic. `BF16` is widened to f32, accumulated in f32 and rounded to bf16 once at the
//! end (round-to-nearest-even, `half::bf16::from_f32`), matching what the MPI backend does.

use crate::dtype::{DType, ReduceOp};
use bytemuck::Pod;

/// Reduces `inputs` (each `count` elements of `dtype`, byte range `[start, start + len)` of
/// every input) element-wise with `op`. All inputs must hold the byte range; the caller has
/// validated lengths.
pub(crate) fn reduce_range(
    dtype: DType,
    op: ReduceOp,
    inputs: &[&[u8]],
    start: usize,
    len: usize,
) -> Vec<u8> {
    let slices: Vec<&[u8]> = inputs
        .iter()
        .map(|b| b.get(start..start + len).unwrap_or(&[]))
        .collect();
    match dtype {
        DType::F32 => reduce_typed::<f32, f32>(&slices, |x| x, |a| a, float_op(op)),
        DType::F64 => reduce_typed::<f64, f64>(&slices, |x| x, |a| a, float_op(op)),
        DType::BF16 => reduce_typed::<half::bf16, f32>(
            &slices,
            |x| x.to_f32(),
            half::bf16::from_f32,
            float_op(op),
        ),
        DType::U8 => reduce_typed::<u8, u8>(
            &slices,
            |x| x,
            |a| a,
            match op {
                ReduceOp::Sum => |a: u8, b: u8| a.wrapping_add(b),
                ReduceOp::Max => |a: u8, b: u8| a.max(b),
                ReduceOp::Min => |a: u8, b: u8| a.min(b),
            },
        ),
    }
}

fn float_op<A: PartialOrd + std::ops::Add<Output = A>>(op: ReduceOp) -> fn(A, A) -> A {
    match op {
        ReduceOp::Sum => |a, b| a + b,
        ReduceOp::Max => |a, b| if b > a { b } else { a },
        ReduceOp::Min => |a, b| if b < a { b } else { a },
    }
}

fn reduce_typed<T: Pod, A: Copy>(
    inputs: &[&[u8]],
    load: fn(T) -> A,
    store: fn(A) -> T,
    combine: fn(A, A) -> A,
) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    let n = first.len() / size;
    let mut out = Vec::with_capacity(n * size);
    for i in 0..n {
        let range = i * size..(i + 1) * size;
        let mut acc = load(bytemuck::pod_read_unaligned::<T>(&first[range.clone()]));
        for input in &inputs[1..] {
            let x = load(bytemuck::pod_read_unaligned::<T>(&input[range.clone()]));
            acc = combine(acc, x);
        }
        out.extend_from_slice(bytemuck::bytes_of(&store(acc)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_once() {
        // 256 + 1 + 1: in bf16 (8 significant bits) 256 + 1 rounds back to 256 at every step,
        // but accumulated in f32 the sum is 258, which is representable in bf16.
        let a = half::bf16::from_f32(256.0);
        let b = half::bf16::from_f32(1.0);
        let bytes: Vec<Vec<u8>> = [a, b, b]
            .iter()
            .map(|x| bytemuck::bytes_of(x).to_vec())
            .collect();
        let refs: Vec<&[u8]> = bytes.iter().map(|v| v.as_slice()).collect();
        let out = reduce_range(DType::BF16, ReduceOp::Sum, &refs, 0, 2);
        let got: half::bf16 = bytemuck::pod_read_unaligned(&out);
        assert_eq!(got.to_f32(), 258.0);
        // step-by-step bf16 rounding would give 256
        assert_eq!(((a + b) + b).to_f32(), 256.0);
    }

    #[test]
    fn u8_sum_wraps_and_max_min() {
        let x = [200u8, 3];
        let y = [100u8, 9];
        let refs: Vec<&[u8]> = vec![&x, &y];
        assert_eq!(
            reduce_range(DType::U8, ReduceOp::Sum, &refs, 0, 2),
            vec![44, 12]
        );
        assert_eq!(
            reduce_range(DType::U8, ReduceOp::Max, &refs, 0, 2),
            vec![200, 9]
        );
        assert_eq!(reduce_range(DType::U8, ReduceOp::Min, &refs, 1, 1), vec![3]);
    }
}
