//! Element types and reduction operators.

/// Element type of a raw buffer. Buffers are little-endian byte images of `[T]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// IEEE-754 binary64.
    F64,
    /// bfloat16 (`half::bf16`). Reductions accumulate in f32 and round once (see
    /// [`crate::Communicator::all_reduce_raw`]).
    BF16,
    /// Raw bytes / unsigned 8-bit integers. Sum wraps modulo 256 (C `unsigned char` semantics).
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// All dtypes, for exhaustive tests.
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::U8];
}

/// Element-wise reduction operator.
///
/// `Max`/`Min` compare with `>`/`<`: when a comparison with NaN is false the earlier rank's
/// value is kept (threads backend); MPI's handling of NaN is implementation-defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (wrapping for `U8`).
    Sum,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
}

impl ReduceOp {
    /// All reduce ops, for exhaustive tests.
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min];
}

/// A Rust element type with a [`DType`]: `f32`, `f64`, `half::bf16`, `u8`.
pub trait Element: bytemuck::Pod {
    /// The matching dtype.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}
