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
/// (one [`Communicator::split`], as [`mesh_dims_comm`] of `[mesh_dim]`).
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
    mesh_dims_comm(world, mesh, &[mesh_dim])
}

/// The communicator of the flattened mesh dims `mesh_dims` containing this rank (PyTorch's
/// `mesh["dp", "tp"]._flatten()`): the ranks that differ from this one only in their
/// coordinates on `mesh_dims`. The new rank is this rank's coordinate on those dims read
/// row-major in the order given (the first dim slowest; ascending dims number the ranks as a
/// flattened DeviceMesh does); the sub-communicator has the product of their sizes ranks.
/// `mesh_dims = [m]` is the group of [`mesh_dim_comm`].
///
/// Collective: every rank of `world` must call it with the same mesh and `mesh_dims`
/// (one [`Communicator::split`], color = the coordinates on the other dims read row-major).
///
/// Errors: `world.size() != mesh.size()`, a mesh dim out of range or named twice
/// ([`CommError::Mesh`]), or an error of `split`.
pub fn mesh_dims_comm(
    world: &dyn Communicator,
    mesh: &DeviceMesh,
    mesh_dims: &[usize],
) -> Result<Box<dyn Communicator>> {
    let shape = mesh.shape();
    if world.size() != mesh.size() {
        return Err(CommError::Mesh(format!(
            "communicator has {} ranks but mesh {shape:?} has {}",
            world.size(),
            mesh.size()
        )));
    }
    for (i, &m) in mesh_dims.iter().enumerate() {
        if m >= shape.len() || mesh_dims[..i].contains(&m) {
            return Err(CommError::Mesh(format!(
                "mesh {shape:?}: cannot flatten mesh dims {mesh_dims:?} (dim {m} out of range or repeated)"
            )));
        }
    }
    let coord = mesh
        .coordinate(world.rank())
        .map_err(|e| CommError::Mesh(format!("mesh {shape:?}: {e}")))?;
    let key = mesh_dims.iter().fold(0, |a, &m| a * shape[m] + coord[m]);
    let color = (0..shape.len())
        .filter(|m| !mesh_dims.contains(m))
        .fold(0, |a, m| a * shape[m] + coord[m]);
    let sub = world.split(color, key)?;
    let want: usize = mesh_dims.iter().map(|&m| shape[m]).product();
    if sub.size() != want || sub.rank() != key {
        return Err(CommError::Internal(format!(
            "mesh dims {mesh_dims:?}: split gave rank {}/{} but expected {key}/{want}",
            sub.rank(),
            sub.size()
        )));
    }
    Ok(sub)
}
