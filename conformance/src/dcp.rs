//! `dcp`: checks a torch distributed checkpoint as it is on disk (`conformance dcp --checkpoint DIR
//! [--model HF_DIR]`), whatever wrote it: torch's `FileSystemWriter`, its Hugging Face storage, or
//! this project's writer.
//!
//! Per tensor (check `FQN`): every chunk inside the global shape, chunks covering every element
//! exactly once, each item present, decodable, of the recorded dtype and the chunk's sizes, its
//! storage holding every element its strides reach and (torch's format) its CRC-32 as the archive
//! records; the note gives dtype, global shape, chunk count and the placements the chunk layout
//! implies on a mesh of the checkpoint's world size (`[S(1)] on [2]`, or that none fits). With
//! `--model`, every tensor whose key follows one of the model's three namings (HF disk,
//! transformers 5.x in memory, native; [`adapters::model_shapes`]) is checked against the shape
//! the config gives (check `FQN: model shape`); a mismatch names both shapes and the placement the
//! chunks are consistent with. Non-tensor items are listed (check `FQN: non-tensor item`).

use crate::report::Check;
use adapters::dcp::{self, DcpCheckpoint, StorageFormat};
use adapters::model_shapes::ModelShapes;
use placement::chunks::{
    candidate_meshes, placements_fitting, placements_with_chunk_sizes, ChunkBox,
};
use placement::{format_placements, DeviceMesh, Placement};
use std::path::Path;

/// Options of [`run`].
#[derive(Debug, Clone, Default)]
pub struct DcpArgs {
    /// An HF model directory (its `config.json`) to hold the shapes against.
    pub model: Option<std::path::PathBuf>,
    /// The save mesh, when known (otherwise every mesh of the world size is tried).
    pub mesh: Option<Vec<usize>>,
    /// Skip the CRC-32 check of the item storages (reads every byte).
    pub no_crc: bool,
}

/// Placements (and the mesh) the chunk layout of a tensor implies.
fn implied(
    shape: &[usize],
    boxes: &[ChunkBox],
    meshes: &[Vec<usize>],
) -> Option<(Vec<Placement>, Vec<usize>)> {
    meshes.iter().find_map(|m| {
        let mesh = DeviceMesh::new(m.clone()).ok()?;
        placements_fitting(shape, &mesh, boxes).map(|p| (p, m.clone()))
    })
}

/// `S(2)` on a 1-D mesh, `[S(0), S(1)] on [2, 2]` otherwise.
fn short(p: &[Placement], mesh: &[usize]) -> String {
    if p.len() == 1 {
        p[0].to_string()
    } else {
        format!("{} on {mesh:?}", format_placements(p))
    }
}

/// The checks of the checkpoint in `dir` (module docs). `Err` when `dir` cannot be read as a
/// checkpoint at all or `--model` has no usable config.json (one line naming the file).
pub fn run(dir: &Path, args: &DcpArgs) -> Result<(String, Vec<Check>), String> {
    let ck: DcpCheckpoint = dcp::inspect(dir).map_err(|e| e.to_string())?;
    let model = match &args.model {
        Some(m) => Some(ModelShapes::from_dir(m).map_err(|e| e.to_string())?),
        None => None,
    };
    let meshes = match &args.mesh {
        Some(m) => {
            let n: usize = m.iter().product();
            if n != ck.world_size() && ck.format() != StorageFormat::HfConsolidated {
                return Err(format!(
                    "--mesh {m:?} has {n} ranks but {} was saved by {} (from its file names)",
                    dir.display(),
                    ck.world_size()
                ));
            }
            vec![m.clone()]
        }
        None => candidate_meshes(ck.world_size()),
    };
    let header = format!(
        "dcp {}: {}, world size {}, {} tensors, {} non-tensor items{}",
        dir.display(),
        ck.format(),
        ck.world_size(),
        ck.keys().len(),
        ck.bytes_items().len(),
        match &model {
            Some(m) => format!(", model {} (E, H, I) = {:?}", m.model_type(), m.dims()),
            None => String::new(),
        }
    );
    let mut checks = Vec::new();
    for key in ck.keys() {
        let dtype = ck.dtype(&key).map_err(|e| e.to_string())?;
        let shape = ck.global_shape(&key).map_err(|e| e.to_string())?.to_vec();
        let chunks = ck.chunks(&key).map_err(|e| e.to_string())?;
        let boxes: Vec<ChunkBox> = chunks
            .iter()
            .map(|c| ChunkBox {
                offsets: c.offsets.clone(),
                sizes: c.sizes.clone(),
            })
            .collect();
        let mut problems: Vec<String> = ck.problems(&key).map_err(|e| e.to_string())?.to_vec();
        if problems.is_empty() && !args.no_crc {
            if let Err(e) = ck.verify_crc(&key) {
                problems.push(e.to_string());
            }
        }
        let imp = implied(&shape, &boxes, &meshes);
        if problems.is_empty() {
            let layout = match &imp {
                Some((p, m)) => format!("{} on {m:?}", format_placements(p)),
                None => format!(
                    "no placement on a mesh of {} ranks gives these chunks",
                    ck.world_size()
                ),
            };
            checks.push(Check::pass(
                key.clone(),
                format!(
                    "{dtype} {shape:?}, {} chunk{}, {layout}",
                    boxes.len(),
                    if boxes.len() == 1 { "" } else { "s" }
                ),
            ));
        } else {
            checks.push(Check::fail(key.clone(), problems.join("; ")));
        }
        let Some(model) = &model else { continue };
        let cands = model.candidates(&key);
        let Some(first) = cands.first() else { continue };
        let name = format!("{key}: model shape");
        if let Some(c) = cands.iter().find(|c| c.shape == shape) {
            checks.push(Check::pass(
                name,
                format!("{:?} = {} ({})", c.shape, c.dims, c.naming),
            ));
            continue;
        }
        let sizes: Vec<Vec<usize>> = boxes
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| b.sizes.clone())
            .collect();
        let mut distinct = sizes.clone();
        distinct.sort();
        distinct.dedup();
        let what = if distinct.len() == 1 {
            format!("each chunk {:?}", distinct[0])
        } else {
            format!(
                "the chunks {}",
                distinct
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let try_meshes: Vec<Vec<usize>> = match &imp {
            Some((_, m)) => vec![m.clone()],
            None => meshes.clone(),
        };
        let fits = try_meshes.iter().find_map(|m| {
            let mesh = DeviceMesh::new(m.clone()).ok()?;
            placements_with_chunk_sizes(&first.shape, &mesh, &sizes).map(|p| short(&p, m))
        });
        let tail = match (fits, &imp) {
            (Some(f), Some((p, m))) => {
                format!("; {what} is consistent with {f}, not {}", short(p, m))
            }
            (Some(f), None) => format!("; {what} is consistent with {f}"),
            (None, _) => format!(
                "; no placement of {:?} on a mesh of {} ranks gives {what}",
                first.shape,
                ck.world_size()
            ),
        };
        checks.push(Check::fail(
            name,
            format!(
                "chunks of {key} imply {shape:?}; the model expects {:?} ({}){tail}",
                first.shape, first.dims
            ),
        ));
    }
    for (k, b) in ck.bytes_items() {
        let name = format!("{k}: non-tensor item");
        checks.push(match &b.problem {
            None => Check::pass(
                name,
                format!("{} bytes in {} (not decoded)", b.length, b.file),
            ),
            Some(p) => Check::fail(name, p.clone()),
        });
    }
    Ok((header, checks))
}
