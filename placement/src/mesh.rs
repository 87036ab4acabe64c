//! N-D device mesh: shape, optional dim names, rank <-> coordinate (row-major, like
//! `torch.distributed.device_mesh.DeviceMesh` built from `torch.arange(size).view(shape)`).

use crate::error::{PlacementError, Result};

/// A device mesh of `shape` (e.g. `[dp, tp]`), ranks `0..size` laid out row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMesh {
    shape: Vec<usize>,
    names: Option<Vec<String>>,
    size: usize,
}

impl DeviceMesh {
    /// Mesh of `shape`. Errors: empty shape, a dim of size 0, or a product overflowing `usize`.
    pub fn new(shape: Vec<usize>) -> Result<Self> {
        if shape.is_empty() {
            return Err(PlacementError::EmptyMesh);
        }
        if let Some(m) = shape.iter().position(|&s| s == 0) {
            return Err(PlacementError::ZeroMeshDim { mesh_dim: m, shape });
        }
        let size = shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| PlacementError::Overflow {
                what: format!("the number of ranks of mesh {shape:?}"),
            })?;
        Ok(DeviceMesh {
            shape,
            names: None,
            size,
        })
    }

    /// Mesh of `shape` with one name per dim (e.g. `["dp", "tp"]`). Errors as [`DeviceMesh::new`],
    /// plus a name count different from `shape.len()` or a repeated name.
    pub fn with_dim_names(shape: Vec<usize>, names: Vec<String>) -> Result<Self> {
        let mut mesh = DeviceMesh::new(shape)?;
        if names.len() != mesh.shape.len() {
            return Err(PlacementError::DimNamesLength {
                names: names.len(),
                ndim: mesh.shape.len(),
            });
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(PlacementError::DuplicateDimName(n.clone()));
            }
        }
        mesh.names = Some(names);
        Ok(mesh)
    }

    /// Size of each mesh dim.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of mesh dims.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Number of ranks (product of the shape).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Dim names, when the mesh has them.
    pub fn dim_names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// Index of the mesh dim called `name`. Errors when there is no such name (or no names at all).
    pub fn dim_index(&self, name: &str) -> Result<usize> {
        self.names
            .as_ref()
            .and_then(|ns| ns.iter().position(|n| n == name))
            .ok_or_else(|| PlacementError::UnknownDimName {
                name: name.to_string(),
                names: self.names.clone().unwrap_or_default(),
            })
    }

    /// Size of mesh dim `mesh_dim`. Errors when `mesh_dim >= ndim`.
    pub fn dim_size(&self, mesh_dim: usize) -> Result<usize> {
        self.shape
            .get(mesh_dim)
            .copied()
            .ok_or(PlacementError::MeshDimOutOfRange {
                mesh_dim,
                ndim: self.ndim(),
            })
    }

    /// Row-major coordinate of `rank` (last mesh dim fastest), as `DeviceMesh.get_coordinate`.
    /// Errors when `rank >= size`.
    pub fn coordinate(&self, rank: usize) -> Result<Vec<usize>> {
        if rank >= self.size {
            return Err(PlacementError::RankOutOfRange {
                rank,
                size: self.size,
            });
        }
        let mut coord = vec![0; self.shape.len()];
        let mut rest = rank;
        for (c, &s) in coord.iter_mut().zip(&self.shape).rev() {
            *c = rest % s;
            rest /= s;
        }
        Ok(coord)
    }

    /// Checks `coord` has one entry per mesh dim, each below that dim's size.
    pub fn check_coordinate(&self, coord: &[usize]) -> Result<()> {
        if coord.len() != self.shape.len() {
            return Err(PlacementError::CoordinateLength {
                coordinate: coord.to_vec(),
                ndim: self.shape.len(),
            });
        }
        for (m, (&c, &s)) in coord.iter().zip(&self.shape).enumerate() {
            if c >= s {
                return Err(PlacementError::CoordinateOutOfRange {
                    coordinate: coord.to_vec(),
                    mesh_dim: m,
                    value: c,
                    size: s,
                });
            }
        }
        Ok(())
    }

    /// Rank at `coord` (inverse of [`DeviceMesh::coordinate`]). Errors as
    /// [`DeviceMesh::check_coordinate`].
    pub fn rank_of(&self, coord: &[usize]) -> Result<usize> {
        self.check_coordinate(coord)?;
        // Cannot overflow: the result is < size, which fits.
        Ok(coord
            .iter()
            .zip(&self.shape)
            .fold(0usize, |acc, (&c, &s)| acc * s + c))
    }

    /// Groups of ranks that differ only in coordinate `mesh_dim` (the process groups of that mesh
    /// dim, as `DeviceMesh._init_process_groups` builds them from
    /// `mesh.swapdims(-1, mesh_dim).reshape(-1, size)`): each group ordered by its coordinate on
    /// `mesh_dim`, groups ordered by their lowest rank. `size / shape[mesh_dim]` groups of
    /// `shape[mesh_dim]` ranks. Errors when `mesh_dim >= ndim`.
    pub fn dim_groups(&self, mesh_dim: usize) -> Result<Vec<Vec<usize>>> {
        let k = self.dim_size(mesh_dim)?;
        let stride: usize = self.shape[mesh_dim + 1..].iter().product();
        let mut groups = Vec::with_capacity(self.size / k);
        for rank in 0..self.size {
            // The group's lowest rank has coordinate 0 on mesh_dim.
            if (rank / stride) % k == 0 {
                groups.push((0..k).map(|i| rank + i * stride).collect());
            }
        }
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_errors() {
        assert_eq!(DeviceMesh::new(vec![]), Err(PlacementError::EmptyMesh));
        assert!(matches!(
            DeviceMesh::new(vec![2, 0]),
            Err(PlacementError::ZeroMeshDim { mesh_dim: 1, .. })
        ));
        assert!(DeviceMesh::new(vec![usize::MAX, 2]).is_err());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(DeviceMesh::with_dim_names(vec![2, 2], names(&["dp"])).is_err());
        assert_eq!(
            DeviceMesh::with_dim_names(vec![2, 2], names(&["dp", "dp"])),
            Err(PlacementError::DuplicateDimName("dp".into()))
        );
        let m = DeviceMesh::with_dim_names(vec![2, 4], names(&["dp", "tp"])).unwrap();
        assert_eq!(m.dim_index("tp"), Ok(1));
        assert!(m.dim_index("ep").is_err());
        assert_eq!(m.dim_names(), Some(&names(&["dp", "tp"])[..]));
        assert!(DeviceMesh::new(vec![2]).unwrap().dim_index("dp").is_err());
    }

    #[test]
    fn coordinates_row_major() {
        let m = DeviceMesh::new(vec![2, 3, 4]).unwrap();
        assert_eq!(m.size(), 24);
        assert_eq!(m.ndim(), 3);
        // Independent reference: nested loops in row-major order.
        let mut rank = 0;
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    assert_eq!(m.coordinate(rank).unwrap(), vec![a, b, c]);
                    assert_eq!(m.rank_of(&[a, b, c]).unwrap(), rank);
                    rank += 1;
                }
            }
        }
        assert!(m.coordinate(24).is_err());
        assert!(m.rank_of(&[0, 3, 0]).is_err());
        assert!(m.rank_of(&[0, 0]).is_err());
    }

    #[test]
    fn process_groups() {
        // torch: arange(6).view(2,3).swapdims(-1, 0).reshape(-1, 2) = [[0,3],[1,4],[2,5]]
        let m = DeviceMesh::new(vec![2, 3]).unwrap();
        assert_eq!(
            m.dim_groups(0).unwrap(),
            vec![vec![0, 3], vec![1, 4], vec![2, 5]]
        );
        assert_eq!(m.dim_groups(1).unwrap(), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert!(m.dim_groups(2).is_err());
        // 3-D: groups of the middle dim of (2,2,2).
        let m = DeviceMesh::new(vec![2, 2, 2]).unwrap();
        assert_eq!(
            m.dim_groups(1).unwrap(),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        // Each group: ranks equal in every coordinate but mesh_dim, ordered by that coordinate.
        let m = DeviceMesh::new(vec![3, 2, 4]).unwrap();
        for d in 0..3 {
            let groups = m.dim_groups(d).unwrap();
            assert_eq!(groups.len(), 24 / m.shape()[d]);
            let mut seen = [false; 24];
            for g in &groups {
                let c0 = m.coordinate(g[0]).unwrap();
                for (i, &r) in g.iter().enumerate() {
                    assert!(!seen[r]);
                    seen[r] = true;
                    let mut c = c0.clone();
                    c[d] = i;
                    assert_eq!(m.coordinate(r).unwrap(), c);
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }
}
