//! Groups of an [`super::Fsdp`]'s parameters, each sharded over its own communicator:
//! e.g. the dense parameters over every data- and expert-parallel rank, the routed
//! experts (already split by expert parallelism) over the data-parallel ranks only.

use super::Shards;
use crate::collective::even_bounds;
use crate::layout::Layout;
use crate::DpError;
use burn::module::ParamId;
use burn_comm::Comm;
use std::collections::{HashMap, HashSet};

/// Which of a module's trainable parameters one shard holds, over which ranks, and how
/// their gradients are scaled.
///
/// A group sums the gradients of its parameters over the ranks of `comm` (and of the
/// replicas under HSDP) and divides the sum by the gradient divide factor: the number of
/// those ranks unless [`ShardGroup::with_gradient_divide_factor`] says otherwise (PyTorch
/// FSDP's `set_gradient_divide_factor`).
///
/// # Example
/// With expert parallelism each `ep` rank's loss is its share of its `ep` group's
/// objective, so a dense gradient summed over the `dp × ep` ranks and an expert's gradient
/// summed over `dp` are both divided by the data-parallel size `dp` (torchtitan's rule for
/// the experts' divide factor):
/// ```
/// use burn_comm::{Comm, Transport};
/// use burn_dp::ShardGroup;
///
/// let (world, dp) = (Comm::group(1, Transport::Host).remove(0), 1);
/// let dp_comm = world.clone();
/// let expert_ids = Vec::new(); // the routed experts' parameter ids
/// let groups = vec![
///     ShardGroup::new(world).with_gradient_divide_factor(dp),
///     ShardGroup::new(dp_comm).with_params(expert_ids).with_gradient_divide_factor(dp),
/// ];
/// assert!(groups[0].params().is_none()); // the parameters no other group takes
/// ```
#[derive(Clone, Debug)]
pub struct ShardGroup {
    comm: Comm,
    replicas: Option<Comm>,
    divide_factor: Option<usize>,
    params: Option<HashSet<ParamId>>,
}

impl ShardGroup {
    /// The parameters no other group names, sharded over the ranks of `comm`.
    pub fn new(comm: Comm) -> Self {
        ShardGroup { comm, replicas: None, divide_factor: None, params: None }
    }

    /// HSDP: the ranks of `replicas` hold the same shards in the other groups; gradients
    /// are summed across them too.
    pub fn with_replicas(mut self, replicas: Comm) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Only the parameters `ids` (trainable parameters of the module, in no other group).
    pub fn with_params(mut self, ids: impl IntoIterator<Item = ParamId>) -> Self {
        self.params = Some(ids.into_iter().collect());
        self
    }

    /// Divide the summed gradients by `factor` instead of the number of ranks summed over.
    pub fn with_gradient_divide_factor(mut self, factor: usize) -> Self {
        self.divide_factor = Some(factor);
        self
    }

    /// The parameters named by [`ShardGroup::with_params`]; `None`: all the others.
    pub fn params(&self) -> Option<&HashSet<ParamId>> {
        self.params.as_ref()
    }
}

/// One group as built: its parameters' layout and its sharding.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    pub layout: Layout,
    pub shards: Shards,
}

/// Every group's plan, and where each parameter is: `(group, index in its layout)`.
#[derive(Clone, Debug)]
pub(super) struct Plans {
    pub groups: Vec<Plan>,
    place: HashMap<ParamId, (usize, usize)>,
}

impl Plans {
    /// The groups' layouts cut out of the module's `full` layout and checked across each
    /// group's ranks (collective, in the groups' order).
    ///
    /// # Errors
    /// [`DpError::Config`] for no group, two groups taking the rest, a parameter named
    /// twice or not a trainable parameter of the module, one in no group, an empty group
    /// or a divide factor of 0; [`DpError::Layout`] when a group's ranks built different modules.
    pub fn build(full: &Layout, groups: Vec<ShardGroup>) -> Result<Plans, DpError> {
        let config = |detail: String| Err(DpError::Config { detail });
        if groups.is_empty() {
            return config("FSDP needs at least one shard group".into());
        }
        if groups.iter().filter(|g| g.params.is_none()).count() > 1 {
            return config("two FSDP shard groups take the remaining parameters".into());
        }
        let mut claimed = HashSet::new();
        for (g, group) in groups.iter().enumerate() {
            for id in group.params.iter().flatten() {
                if full.index(id).is_none() {
                    return config(format!(
                        "FSDP shard group {g} names parameter {id}, which is not a \
                         trainable parameter of the module"
                    ));
                }
                if !claimed.insert(*id) {
                    return config(format!(
                        "FSDP shard group {g} names parameter {id}, which an earlier \
                         group holds"
                    ));
                }
            }
        }
        if groups.iter().all(|g| g.params.is_some()) {
            // Without a group for the rest, a parameter outside every group would train
            // on this rank's gradient alone.
            if let Some(i) = (0..full.len()).find(|i| !claimed.contains(&full.ids[*i])) {
                return config(format!(
                    "trainable parameter {} (shape {:?}) is in no FSDP shard group (add a \
                     group without a parameter list for the rest)",
                    full.ids[i], full.shapes[i]
                ));
            }
        }
        let mut plans = Vec::with_capacity(groups.len());
        let mut place = HashMap::new();
        for (g, group) in groups.into_iter().enumerate() {
            let layout = match &group.params {
                Some(ids) => full.only(ids),
                None => full.without(&claimed),
            };
            if layout.is_empty() {
                return config(format!("FSDP shard group {g} has no trainable parameter"));
            }
            layout.check(&group.comm)?;
            if let Some(replicas) = &group.replicas {
                layout.check(replicas)?;
            }
            if group.divide_factor == Some(0) {
                return config(format!("FSDP shard group {g}: a gradient divide factor of 0"));
            }
            place.extend(layout.ids.iter().enumerate().map(|(i, id)| (*id, (g, i))));
            let mut shards = Shards { bounds: even_bounds(layout.numel(), group.comm.world_size()), comm: group.comm, replicas: group.replicas, divide_factor: 1 };
            shards.divide_factor = group.divide_factor.unwrap_or(shards.dp_size());
            plans.push(Plan { layout, shards });
        }
        Ok(Plans { groups: plans, place })
    }

    /// The group and the index in its layout of parameter `id`; `None` for a parameter
    /// that stays whole.
    pub fn place(&self, id: &ParamId) -> Option<(usize, usize)> {
        self.place.get(id).copied()
    }
}
