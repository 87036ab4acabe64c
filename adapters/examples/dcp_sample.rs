//! Writes a distributed checkpoint with `adapters::dcp` as 4 ranks on a `[2, 2]` mesh would (packed
//! gate|up `[S(0), _S(2, 2)]`, `[_S(0, 2), S(0)]`, `[R, S(1)]`, replicated and 0-d tensors, five
//! dtypes) and, beside it, `DIR.expected.safetensors` with every tensor in full: the input of
//! `python3 conformance/fixtures/generate_dcp.py verify-ours DIR`, which loads DIR with stock torch.
//!
//!     cargo run -p adapters --example dcp_sample -- /tmp/ours_sample

use adapters::dcp::{self, ShardToSave};
use adapters::{Dtype, HostTensor};
use placement::{local_shard, parse_placements, DeviceMesh};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tensor(seed: u64, dtype: Dtype, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let es = dtype.bitsize() / 8;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..n * es)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // bool must be 0 / 1; keep bf16/f16 finite by clearing the top exponent bit
            match dtype {
                Dtype::BOOL => (x & 1) as u8,
                Dtype::BF16 | Dtype::F16 if i % 2 == 1 => (x as u8) & 0x3f,
                Dtype::F32 if i % 4 == 3 => (x as u8) & 0x3f,
                Dtype::F64 if i % 8 == 7 => (x as u8) & 0x3f,
                _ => x as u8,
            }
        })
        .collect();
    HostTensor::new(dtype, shape.to_vec(), data).expect("sizes agree")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: dcp_sample DIR")?);
    let mesh = DeviceMesh::new(vec![2, 2])?;
    let items: Vec<(&str, HostTensor, &str)> = vec![
        (
            "model.layers.0.mlp.experts.gate_and_up_projs",
            tensor(1, Dtype::BF16, &[4, 5, 12]),
            "[S(0), _S(2, 2)]",
        ),
        (
            "model.layers.0.mlp.experts.down_projs",
            tensor(2, Dtype::BF16, &[4, 6, 5]),
            "[S(0), S(1)]",
        ),
        (
            "model.layers.0.mlp.gate.weight",
            tensor(3, Dtype::F32, &[8, 5]),
            "[_S(0, 2), S(0)]",
        ),
        (
            "model.norm.weight",
            tensor(4, Dtype::F16, &[7]),
            "[R, S(0)]",
        ),
        (
            "model.embed_tokens.weight",
            tensor(5, Dtype::F64, &[3, 5]),
            "[R, R]",
        ),
        ("mask", tensor(6, Dtype::BOOL, &[2, 3]), "[S(1), R]"),
        ("step", tensor(7, Dtype::I64, &[]), "[R, R]"),
    ];
    for rank in 0..mesh.size() {
        let coord = mesh.coordinate(rank)?;
        let mut locals = Vec::new();
        for (_, full, p) in &items {
            let p = parse_placements(p)?;
            let ls = local_shard(&full.shape, &mesh, &p, &coord)?;
            let sets: Vec<_> = (0..full.shape.len())
                .map(|d| ls.dim_indices(d, full.shape[d]))
                .collect();
            locals.push((full.gather(&sets)?, p));
        }
        let shards: Vec<ShardToSave> = items
            .iter()
            .zip(&locals)
            .map(|((k, full, _), (l, p))| ShardToSave {
                key: k,
                local: l,
                global_shape: &full.shape,
                placements: p,
            })
            .collect();
        dcp::save_rank(&dir, &mesh, rank, &shards)?;
    }
    dcp::commit(
        &dir,
        mesh.size(),
        serde_json::json!({"step": 3, "note": "dcp_sample"}),
    )?;
    let full: BTreeMap<String, HostTensor> = items
        .into_iter()
        .map(|(k, t, _)| (k.to_string(), t))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = full
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let name = dir
        .file_name()
        .ok_or("DIR has no name")?
        .to_string_lossy()
        .into_owned();
    let exp = dir.with_file_name(format!("{name}.expected.safetensors"));
    safetensors::serialize_to_file(views, None, &exp)?;
    println!("wrote {} and {}", dir.display(), exp.display());
    Ok(())
}
