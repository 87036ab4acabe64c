//! Sub-communicators of a device mesh's dims.

use crate::communicator::Communicator;
use crate::error::{CommError, Result};
use placement::DeviceMesh;

/// The communicator of mesh dim `mesh_dim` containing this rank: the ranks that differ from
/// this one only in their coordinate on `mesh_dim` (`DeviceMesh::dim_groups`, as PyTorch's
/// `DeviceMesh._init_process_groups` builds them). The new rank is this rank's coordinate on
/// `mesh_dim`; the sub-communicator has `mesh.shape()[mesh_dim]` ranks.
///
/// The world communicator's ranks are the mesh's ranks (row-major, last mesh dim fastest).
/// Collective: every rank of `world` must call it with the same mesh and `mesh_dim`
/// (implemented with one [`Communicator::split`], color = index of the group, key = coordinate).
///
/// Errors: `world.size() != mesh.size()`, `mesh_dim >= mesh.ndim()` ([`CommError::Mesh`]),
/// or an error of `split`.
///
/// ```
/// use collectives::{mesh_dim_comm, threads::spawn_world, CommunicatorExt, ReduceOp};
/// use placement::DeviceMesh;
///
/// let mesh = DeviceMesh::new(vec![2, 2]).unwrap(); // [dp, tp]: tp groups {0,1}, {2,3}
/// let results = spawn_world(4, |world| {
///     let tp = mesh_dim_comm(&*world, &mesh, 1)?;
///     let mut x = [world.rank() as f32];
///     tp.all_reduce(&mut x, ReduceOp::Sum)?;
///     let counts = [1, 2]; // uneven all_gather along tp
///     tp.all_gather(&vec![x[0]; counts[tp.rank()]], &counts)
/// });
/// let got: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
/// assert_eq!(got[0], vec![1.0, 1.0, 1.0]);
/// assert_eq!(got[3], vec![5.0, 5.0, 5.0]);
/// ```
pub fn mesh_dim_comm(
    world: &dyn Communicator,
    mesh: &DeviceMesh,
    mesh_dim: usize,
) -> Result<Box<dyn Communicator>> {
    if world.size() != mesh.size() {
        return Err(CommError::Mesh(format!(
            "communicator has {} ranks but mesh {:?} has {}",
            world.size(),
            mesh.shape(),
            mesh.size()
        )));
    }
    let groups = mesh
        .dim_groups(mesh_dim)
        .map_err(|e| CommError::Mesh(format!("mesh {:?}, dim {mesh_dim}: {e}", mesh.shape())))?;
    let rank = world.rank();
    let (color, key) = groups
        .iter()
        .enumerate()
        .find_map(|(g, members)| members.iter().position(|&r| r == rank).map(|k| (g, k)))
        .ok_or_else(|| {
            CommError::Mesh(format!(
                "rank {rank} is in no group of mesh {:?} dim {mesh_dim}",
                mesh.shape()
            ))
        })?;
    let sub = world.split(color, key)?;
    let want = groups[color].len();
    if sub.size() != want || sub.rank() != key {
        return Err(CommError::Internal(format!(
            "mesh dim {mesh_dim}: split gave rank {}/{} but expected {key}/{want}",
            sub.rank(),
            sub.size()
        )));
    }
    Ok(sub)
}
