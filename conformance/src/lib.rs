//! Conformance checks of the MoE stack against single-device references, on one rank or many.
//!
//! Suites (see [`suites::Suite`]): `roundtrip` (HF -> native -> HF bit-identity), `golden` (MoE block
//! forward vs transformers), `sharded` (local shards per EP / EP x FSDP plan: shapes vs `placement`,
//! gathered bit-exact, both directions), `collectives` (the communicator against naive references), `placement` (PyTorch-generated
//! placement cases), `parallel` (distributed MoE blocks per EP / TP / SP / FSDP plan vs the
//! single-device reference, [`parallel`]), `checkpoint` (distributed save, reshard on load,
//! consolidation, [`checkpoint`]); [`train`] (AdamW save / resume of a small MoE model); and [`dcp`]
//! (a torch distributed checkpoint on disk, against its own metadata and a model's shapes).
//! The `conformance` binary runs them under the threads backend or under `mpirun`; `cargo xtask
//! conformance` runs the matrix and writes the reports.

pub mod bar;
pub mod checkpoint;
pub mod dcp;
pub mod dcp_plan;
pub mod family;
pub mod fault;
pub mod gather;
pub mod golden;
pub mod parallel;
pub mod placement_cases;
pub mod report;
pub mod roundtrip;
pub mod sharded;
pub mod suites;
pub mod train;
