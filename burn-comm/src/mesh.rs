//! [`DeviceMesh`]: the ranks of a job laid out over named dimensions (`pp`, `dp`, `ep`,
//! ...), with a communicator along each.

use crate::{Comm, CommError};

/// Why a mesh cannot be built.
#[derive(Clone, Debug, PartialEq)]
pub enum MeshError {
    /// The dimensions' sizes multiply to something other than the world size.
    WorldSize {
        /// The dimensions asked for.
        dims: Vec<(String, usize)>,
        /// Their product.
        product: usize,
        /// Ranks in the world.
        world: usize,
    },
    /// A dimension of size 0.
    EmptyDim(String),
    /// Two dimensions with one name.
    DuplicateDim(String),
    /// No dimension of this name.
    UnknownDim {
        /// The name asked for.
        name: String,
        /// The mesh's dimensions.
        dims: Vec<String>,
    },
    /// Building the sub-communicators failed.
    Comm(CommError),
}

impl core::fmt::Display for MeshError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MeshError::WorldSize { dims, product, world } => {
                let shape: Vec<String> = dims.iter().map(|(n, s)| format!("{n} {s}")).collect();
                write!(f, "a mesh of {} has {product} ranks, the world has {world}", shape.join(" × "))
            }
            MeshError::EmptyDim(name) => write!(f, "mesh dimension {name} has size 0"),
            MeshError::DuplicateDim(name) => write!(f, "mesh dimension {name} is named twice"),
            MeshError::UnknownDim { name, dims } => {
                write!(f, "no mesh dimension {name} (the mesh has {dims:?})")
            }
            MeshError::Comm(e) => write!(f, "building the mesh's communicators: {e}"),
        }
    }
}

impl std::error::Error for MeshError {}

impl From<CommError> for MeshError {
    fn from(e: CommError) -> Self {
        MeshError::Comm(e)
    }
}

/// The world's ranks as a row-major grid over named dimensions (the last varies
/// fastest, as in PyTorch's `init_device_mesh`): rank `r` of a `[pp 2, ep 2]` mesh has
/// coordinates `(r / 2, r % 2)`. Each dimension has a communicator over the ranks that
/// differ only along it; the same mesh works over threads and MPI processes.
///
/// # Example
/// ```
/// use burn_comm::{launch, Comm, CommError, DeviceMesh, Transport};
///
/// let out = launch(Comm::group(4, Transport::Host), |world| {
///     let mesh = DeviceMesh::new(&world, &[("pp", 2), ("ep", 2)]).map_err(|e| CommError::Shape { rank: world.rank(), op: "mesh", detail: e.to_string() })?;
///     let ep = mesh.comm("ep").unwrap();
///     // The ep group of rank 3 is ranks 2 and 3.
///     Ok::<_, CommError>((mesh.coord("pp").unwrap(), ep.global_ranks().to_vec()))
/// })
/// .unwrap();
/// assert_eq!(out[3], (1, vec![2, 3]));
/// ```
#[derive(Clone, Debug)]
pub struct DeviceMesh {
    names: Vec<String>,
    sizes: Vec<usize>,
    coords: Vec<usize>,
    world: Comm,
    comms: Vec<Comm>,
}

impl DeviceMesh {
    /// Checks that `dims` describe a mesh of `world` ranks: sizes above 0, distinct
    /// names, product equal to `world`. Pure, so a launcher can check its flags before
    /// any work.
    pub fn validate(dims: &[(&str, usize)], world: usize) -> Result<(), MeshError> {
        for (i, (name, size)) in dims.iter().enumerate() {
            if *size == 0 {
                return Err(MeshError::EmptyDim(name.to_string()));
            }
            if dims[..i].iter().any(|(n, _)| n == name) {
                return Err(MeshError::DuplicateDim(name.to_string()));
            }
        }
        let product: usize = dims.iter().map(|(_, s)| s).product();
        if product != world {
            return Err(MeshError::WorldSize { dims: dims.iter().map(|(n, s)| (n.to_string(), *s)).collect(), product, world });
        }
        Ok(())
    }

    /// The mesh over `world`'s ranks. Collective: every rank of `world` calls it with the
    /// same dimensions.
    pub fn new(world: &Comm, dims: &[(&str, usize)]) -> Result<Self, MeshError> {
        Self::validate(dims, world.world_size())?;
        let sizes: Vec<usize> = dims.iter().map(|(_, s)| *s).collect();
        let coords = coords_of(&sizes, world.rank());
        let mut comms = Vec::with_capacity(dims.len());
        for along in 0..dims.len() {
            let (color, key) = color_key(&sizes, &coords, &[along]);
            comms.push(world.split(color, key)?);
        }
        Ok(DeviceMesh { names: dims.iter().map(|(n, _)| n.to_string()).collect(), sizes, coords, world: world.clone(), comms })
    }

    /// The dimensions, in order, with their sizes.
    pub fn dims(&self) -> Vec<(&str, usize)> {
        self.names.iter().map(String::as_str).zip(self.sizes.iter().copied()).collect()
    }

    /// The communicator over the whole mesh.
    pub fn world(&self) -> &Comm {
        &self.world
    }

    /// This rank in the whole mesh.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// This rank's coordinates, one per dimension.
    pub fn coords(&self) -> &[usize] {
        &self.coords
    }

    fn index(&self, name: &str) -> Result<usize, MeshError> {
        self.names.iter().position(|n| n == name).ok_or_else(|| MeshError::UnknownDim { name: name.to_string(), dims: self.names.clone() })
    }

    /// The size of dimension `name`.
    pub fn size(&self, name: &str) -> Result<usize, MeshError> {
        Ok(self.sizes[self.index(name)?])
    }

    /// This rank's coordinate along `name`.
    pub fn coord(&self, name: &str) -> Result<usize, MeshError> {
        Ok(self.coords[self.index(name)?])
    }

    /// The communicator over the ranks that differ from this one only along `name`
    /// (ranked by their coordinate along it).
    pub fn comm(&self, name: &str) -> Result<&Comm, MeshError> {
        Ok(&self.comms[self.index(name)?])
    }

    /// A communicator over the ranks that differ from this one only along the dimensions
    /// `names` (e.g. `["dp_replicate", "dp_shard"]`: all data-parallel ranks), ranked
    /// row-major over them. Collective: every rank of the mesh calls it.
    pub fn group(&self, names: &[&str]) -> Result<Comm, MeshError> {
        let along: Vec<usize> = names.iter().map(|n| self.index(n)).collect::<Result<_, _>>()?;
        let (color, key) = color_key(&self.sizes, &self.coords, &along);
        Ok(self.world.split(color, key)?)
    }

    /// The rank of the mesh at `coords`.
    pub fn rank_at(&self, coords: &[usize]) -> usize {
        coords.iter().zip(&self.sizes).fold(0, |acc, (c, s)| acc * s + c)
    }
}

/// Coordinates of `rank` in a row-major grid of `sizes`.
fn coords_of(sizes: &[usize], rank: usize) -> Vec<usize> {
    let mut coords = vec![0; sizes.len()];
    let mut rest = rank;
    for (c, s) in coords.iter_mut().zip(sizes).rev() {
        *c = rest % s;
        rest /= s;
    }
    coords
}

/// The split of the ranks that differ only along the dimensions `along`: the color is
/// the row-major index of the other coordinates, the key that of these.
fn color_key(sizes: &[usize], coords: &[usize], along: &[usize]) -> (usize, usize) {
    let (mut color, mut key) = (0, 0);
    for d in 0..sizes.len() {
        if along.contains(&d) {
            key = key * sizes[d] + coords[d];
        } else {
            color = color * sizes[d] + coords[d];
        }
    }
    (color, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{launch, Transport};

    #[test]
    fn bad_meshes_are_named() {
        let err = DeviceMesh::validate(&[("pp", 2), ("ep", 3)], 4).unwrap_err();
        assert_eq!(err.to_string(), "a mesh of pp 2 × ep 3 has 6 ranks, the world has 4");
        assert_eq!(DeviceMesh::validate(&[("pp", 0)], 4).unwrap_err(), MeshError::EmptyDim("pp".into()));
        assert_eq!(DeviceMesh::validate(&[("dp", 2), ("dp", 2)], 4).unwrap_err(), MeshError::DuplicateDim("dp".into()));
        assert!(DeviceMesh::validate(&[("pp", 2), ("dp", 1), ("ep", 2)], 4).is_ok());
    }

    #[test]
    fn coordinates_and_groups_of_a_three_dimensional_mesh() {
        let dims = [("pp", 2), ("dp", 3), ("ep", 2)];
        let out = launch(Comm::group(12, Transport::Host), |world| {
            let mesh = DeviceMesh::new(&world, &dims).map_err(|e| world.shape_error("mesh", e.to_string()))?;
            let per_dim: Vec<Vec<usize>> = ["pp", "dp", "ep"].iter().map(|n| mesh.comm(n).unwrap().global_ranks().to_vec()).collect();
            let dp_ep = mesh.group(&["dp", "ep"]).map_err(|e| world.shape_error("mesh", e.to_string()))?;
            // Collectives on a sub-group see only its ranks.
            let sum: usize = mesh.comm("dp").unwrap().all_gather_host("sum", world.rank())?.iter().sum();
            assert_eq!(mesh.rank_at(mesh.coords()), world.rank());
            Ok::<_, CommError>((mesh.coords().to_vec(), per_dim, dp_ep.global_ranks().to_vec(), dp_ep.rank(), sum))
        })
        .unwrap();
        // Rank 7 = (1, 0, 1).
        let (coords, per_dim, dp_ep, dp_ep_rank, sum) = &out[7];
        assert_eq!(coords, &[1, 0, 1]);
        assert_eq!(per_dim[0], [1, 7]);
        assert_eq!(per_dim[1], [7, 9, 11]);
        assert_eq!(per_dim[2], [6, 7]);
        assert_eq!(dp_ep, &[6, 7, 8, 9, 10, 11]);
        assert_eq!(*dp_ep_rank, 1);
        assert_eq!(*sum, 7 + 9 + 11);
        for (r, (coords, ..)) in out.iter().enumerate() {
            assert_eq!(coords_of(&[2, 3, 2], r), *coords);
        }
    }

    #[test]
    fn unknown_dimension() {
        let out = launch(Comm::group(2, Transport::Host), |world| {
            let mesh = DeviceMesh::new(&world, &[("dp", 2)]).unwrap();
            Ok::<_, CommError>(mesh.comm("ep").unwrap_err().to_string())
        })
        .unwrap();
        assert_eq!(out[0], "no mesh dimension ep (the mesh has [\"dp\"])");
    }
}
