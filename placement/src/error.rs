//! The crate's error type.

use crate::Placement;

/// Details of [`PlacementError::LocalShapeMismatch`].
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("local shape {local:?} at mesh coordinate {coordinate:?} does not match global shape {global:?} under {placements}: expected local {expected:?}; {detail}")]
pub struct ShapeMismatch {
    /// The local shape given.
    pub local: Vec<usize>,
    /// The global shape given.
    pub global: Vec<usize>,
    /// The local shape the placements give.
    pub expected: Vec<usize>,
    /// Mesh coordinate checked.
    pub coordinate: Vec<usize>,
    /// Placements in text form, e.g. `[S(1)]`.
    pub placements: String,
    /// Every disagreeing dim (`dim 1: expected 2048, got 4096`), what `from_local` would infer, and
    /// a consistent alternative placement when there is one.
    pub detail: String,
}

/// Result alias used by every fallible function of this crate.
pub type Result<T> = std::result::Result<T, PlacementError>;

/// Everything that can go wrong in the placement algebra. Each message names the offending value
/// and the limit it broke.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PlacementError {
    /// Text that is not one of the placement forms PyTorch prints (`S(0)`, `Shard(dim=0)`, ...).
    #[error("cannot parse placement `{text}`: {reason}")]
    Parse {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A (possibly negative) dim outside `-ndim..ndim`.
    #[error("dim {dim} is out of range for a tensor of rank {ndim} (valid: {lo}..{ndim})", lo = -(*ndim as i128))]
    DimOutOfRange {
        /// The dim as given.
        dim: i64,
        /// The tensor rank.
        ndim: usize,
    },
    /// A mesh with no dims.
    #[error("a device mesh needs at least one dim, got shape []")]
    EmptyMesh,
    /// A mesh dim of size 0.
    #[error("mesh dim {mesh_dim} has size 0 in mesh shape {shape:?}; every mesh dim must be >= 1")]
    ZeroMeshDim {
        /// Index of the zero-sized mesh dim.
        mesh_dim: usize,
        /// The mesh shape.
        shape: Vec<usize>,
    },
    /// Product of mesh dims (or a tensor extent) does not fit in `usize`.
    #[error("arithmetic overflow computing {what}")]
    Overflow {
        /// What was being computed.
        what: String,
    },
    /// `with_dim_names` got a different number of names than mesh dims.
    #[error("{names} mesh dim names given for a mesh of {ndim} dims")]
    DimNamesLength {
        /// Number of names.
        names: usize,
        /// Number of mesh dims.
        ndim: usize,
    },
    /// Two mesh dims with one name.
    #[error("mesh dim name `{0}` is used more than once")]
    DuplicateDimName(String),
    /// `dim_index` with a name the mesh does not have.
    #[error("mesh has no dim named `{name}` (names: {names:?})")]
    UnknownDimName {
        /// The name asked for.
        name: String,
        /// The mesh's names (empty when the mesh has none).
        names: Vec<String>,
    },
    /// A mesh dim index >= mesh ndim.
    #[error("mesh dim {mesh_dim} is out of range for a mesh of {ndim} dims")]
    MeshDimOutOfRange {
        /// The mesh dim asked for.
        mesh_dim: usize,
        /// The mesh's number of dims.
        ndim: usize,
    },
    /// A global rank >= mesh size.
    #[error("rank {rank} is out of range for a mesh of {size} ranks")]
    RankOutOfRange {
        /// The rank asked for.
        rank: usize,
        /// Number of ranks in the mesh.
        size: usize,
    },
    /// A mesh coordinate with the wrong number of entries.
    #[error("coordinate {coordinate:?} has {} entries, the mesh has {ndim} dims", coordinate.len())]
    CoordinateLength {
        /// The coordinate as given.
        coordinate: Vec<usize>,
        /// The mesh's number of dims.
        ndim: usize,
    },
    /// A mesh coordinate entry >= that mesh dim's size.
    #[error("coordinate {coordinate:?}: entry {mesh_dim} is {value}, mesh dim {mesh_dim} has size {size}")]
    CoordinateOutOfRange {
        /// The coordinate as given.
        coordinate: Vec<usize>,
        /// The offending mesh dim.
        mesh_dim: usize,
        /// The offending entry.
        value: usize,
        /// Size of that mesh dim.
        size: usize,
    },
    /// `chunk` with zero chunks.
    #[error("cannot split into 0 chunks")]
    ZeroChunks,
    /// `chunk` asked for chunk `index` of `chunks`.
    #[error("chunk index {index} is out of range for {chunks} chunks")]
    ChunkOutOfRange {
        /// The chunk asked for.
        index: usize,
        /// Number of chunks.
        chunks: usize,
    },
    /// `_StridedShard` with `split_factor == 0`.
    #[error("split_factor must be >= 1, got 0 (in {placement})")]
    ZeroSplitFactor {
        /// The placement (text form).
        placement: String,
    },
    /// `IndexSet::select` with a position past the end of the set.
    #[error("position {position} is out of range for an index set of {len} elements")]
    IndexOutOfRange {
        /// The position asked for.
        position: usize,
        /// Number of elements in the set.
        len: usize,
    },
    /// A merged step of an alternative plan names a step its plan does not have.
    #[error("a merged step names step {step} of a redistribution plan of {steps} steps")]
    UnknownStep {
        /// The step index named.
        step: usize,
        /// Number of steps in the plan.
        steps: usize,
    },
    /// One placement per mesh dim is required.
    #[error("{placements} placements given for a mesh of {mesh_ndim} dims; DTensor needs exactly one per mesh dim")]
    PlacementCountMismatch {
        /// Number of placements.
        placements: usize,
        /// Number of mesh dims.
        mesh_ndim: usize,
    },
    /// A shard placement naming a tensor dim the tensor does not have.
    #[error("placement {placement} on mesh dim {mesh_dim} shards tensor dim {dim}, but the tensor has rank {tensor_ndim}")]
    ShardDimOutOfRange {
        /// The placement.
        placement: Placement,
        /// Mesh dim carrying it (or its position in the list).
        mesh_dim: usize,
        /// The tensor dim it names.
        dim: usize,
        /// The tensor rank.
        tensor_ndim: usize,
    },
    /// Local and global shapes of different rank.
    #[error("local shape {local:?} has rank {}, global shape {global:?} has rank {}", local.len(), global.len())]
    ShapeRankMismatch {
        /// The local shape.
        local: Vec<usize>,
        /// The global shape.
        global: Vec<usize>,
    },
    /// `validate_global_shape` found a local shape that the placements cannot produce (boxed:
    /// the details are large).
    #[error("{0}")]
    LocalShapeMismatch(Box<ShapeMismatch>),
    /// `perm` is not a permutation of `0..perm.len()`.
    #[error("{perm:?} is not a permutation of 0..{}: {reason}", perm.len())]
    NotAPermutation {
        /// The permutation as given.
        perm: Vec<usize>,
        /// What is wrong.
        reason: String,
    },
    /// Partial placements with reduce ops that cannot be mixed (only sum with avg can).
    #[error("placements {placements} mix Partial reduce ops {first} and {second}; only sum and avg may be mixed")]
    IncompatiblePartials {
        /// Placements in text form.
        placements: String,
        /// First op seen.
        first: String,
        /// The op that conflicts with it.
        second: String,
    },
    /// A redistribution PyTorch refuses (public `DTensor.redistribute`): to a Partial from
    /// anything but the same Partial or a plain `S(d)` -> `P(sum)`.
    #[error("cannot redistribute mesh dim {mesh_dim} from {src} to {dst}: {reason}")]
    UnsupportedRedistribute {
        /// Mesh dim of the offending pair.
        mesh_dim: usize,
        /// Source placement.
        src: Placement,
        /// Target placement.
        dst: Placement,
        /// Why PyTorch rejects it (source of the rule).
        reason: String,
    },
    /// A view op PyTorch refuses (strict `view` rules of `_view_ops.py`), or an op argument that
    /// does not fit the tensor.
    #[error("view op {op} on global shape {shape:?} with {placements}: {reason}")]
    ViewRejected {
        /// The op and its arguments, e.g. `view([6, 4] -> [24])`.
        op: String,
        /// The input global shape.
        shape: Vec<usize>,
        /// The input placements (text form).
        placements: String,
        /// What is wrong.
        reason: String,
    },
    /// Local shapes of all ranks that no global shape explains under the placements (issue
    /// 110762: uneven `from_local` without `shape=`).
    #[error("inconsistent local shapes under {placements}: {detail}")]
    InconsistentLocalShapes {
        /// Placements in text form.
        placements: String,
        /// Which tensor dim, which ranks, expected vs got, and what `from_local` infers per rank.
        detail: String,
    },
    /// A flat data buffer whose length is not the element count of its shape.
    #[error("data of {len} elements does not match shape {shape:?} ({expected} elements)")]
    DataLength {
        /// Elements given.
        len: usize,
        /// The shape.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
    },
    /// A placement-cases document that cannot be read (not JSON, wrong `format`, no `cases`).
    #[error("placement cases: {0}")]
    Cases(String),
    /// An FSDP2 / TP / EP sharding request that the library refuses.
    #[error("{0}")]
    Parallelism(String),
}
