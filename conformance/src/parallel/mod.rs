//! Distributed MoE blocks under EP, TP, SP and FSDP (and EP x TP, EP x FSDP meshes), built from the
//! `moe-kernels` stages and the `collectives` autograd ops, checked against the single-device
//! reference ([`suite`]).

pub mod block;
pub mod comms;
pub mod dispatch;
pub mod plan;
pub mod shards;
pub mod suite;

pub use block::{BlockCtx, DistBlock};
pub use comms::PlanComms;
pub use plan::{Mutation, ParallelPlan, Param, PlanKind};
pub use shards::BlockTensors;
