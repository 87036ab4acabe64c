//! `plan --check-dcp`: a torch distributed checkpoint held against transformers' TP / EP plan of
//! a model ([`adapters::hf_plan::PlanTable`]), as saved from `model.state_dict()` of a
//! `from_pretrained(..., tp_plan="auto")` model.
//!
//! Per parameter of the plan (check `FQN: plan`): the checkpoint holds it, at the plan's global
//! shape; when the checkpoint was saved by the plan's world size, its chunks are exactly the
//! boxes a save of the plan's placements writes ([`placement::chunks::save_boxes`]). A
//! `_StridedShard` placement whose shards are not one box per rank cannot be saved by torch 2.15
//! DCP (overlapping chunks), so a checkpoint holding it as `Shard` on the same dim passes with a
//! note saying so. A checkpoint tensor that is no parameter of the plan (a buffer, optimizer
//! state) is listed as skipped. At another world size only names and shapes are checked (a load
//! reshards by box intersection).

use crate::report::Check;
use adapters::dcp::DcpCheckpoint;
use adapters::hf_plan::PlanTable;
use placement::chunks::{placements_fitting, save_boxes, ChunkBox};
use placement::{format_placements, DeviceMesh, Placement};
use std::path::Path;

fn sorted(mut v: Vec<ChunkBox>) -> Vec<ChunkBox> {
    v.retain(|b| !b.is_empty());
    v.sort();
    v
}

/// The checks of the checkpoint in `dir` against `table` (module docs). `Err` when `dir` cannot
/// be read as a checkpoint at all (one line naming the file).
pub fn check(dir: &Path, table: &PlanTable) -> Result<(String, Vec<Check>), String> {
    let ck: DcpCheckpoint = adapters::dcp::inspect(dir).map_err(|e| e.to_string())?;
    let same_world = ck.world_size() == table.world;
    let header = format!(
        "dcp {} against the plan at world {}: saved by {} ranks{}",
        dir.display(),
        table.world,
        ck.world_size(),
        if same_world {
            ""
        } else {
            " (names and shapes only; a load at the plan's world reshards)"
        }
    );
    let mesh = DeviceMesh::new(vec![table.world]).map_err(|e| e.to_string())?;
    let mut checks = Vec::new();
    for (name, p) in &table.params {
        let check = format!("{name}: plan");
        if !ck.contains(name) {
            checks.push(Check::fail(check, format!("not in {}", dir.display())));
            continue;
        }
        let shape = ck.global_shape(name).map_err(|e| e.to_string())?.to_vec();
        if shape != p.global_shape {
            checks.push(Check::fail(
                check,
                format!(
                    "the checkpoint's global shape {shape:?}, the plan's {:?}",
                    p.global_shape
                ),
            ));
            continue;
        }
        if !same_world {
            checks.push(Check::pass(check, format!("{shape:?}")));
            continue;
        }
        let label = p.placements.clone().unwrap_or(vec![Placement::Replicate]);
        let chunks: Vec<ChunkBox> = ck
            .chunks(name)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|c| ChunkBox {
                offsets: c.offsets,
                sizes: c.sizes,
            })
            .collect();
        let plan_boxes = save_boxes(&shape, &mesh, &label)
            .map_err(|e| format!("{name}: {e}"))?
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let (have, want) = (sorted(chunks.clone()), sorted(plan_boxes));
        let text = format_placements(&label);
        if have == want {
            checks.push(Check::pass(
                check,
                format!("{shape:?} {text}, chunks as the plan"),
            ));
            continue;
        }
        let fits = placements_fitting(&shape, &mesh, &chunks);
        let strided_as_shard = match (label.as_slice(), fits.as_deref()) {
            ([Placement::StridedShard { dim, .. }], Some([Placement::Shard(d)])) => dim == d,
            _ => false,
        };
        let saved = fits
            .as_deref()
            .map(format_placements)
            .unwrap_or_else(|| "no placement".into());
        if strided_as_shard {
            checks.push(Check::pass(
                check,
                format!(
                    "{shape:?} {text} saved as {saved}: torch 2.15 DCP cannot save a {text} shard \
                     that is not one box, so it was redistributed first"
                ),
            ));
        } else {
            checks.push(Check::fail(
                check,
                format!(
                    "the chunks give {saved} on {} ranks, the plan {text} ({} chunks, \
                     the plan's save writes {})",
                    table.world,
                    have.len(),
                    want.len()
                ),
            ));
        }
    }
    for key in ck.keys() {
        if !table.params.contains_key(&key) {
            checks.push(Check::skip(
                format!("{key}: plan"),
                "not a parameter of the model (a buffer or other state)",
            ));
        }
    }
    Ok((header, checks))
}
