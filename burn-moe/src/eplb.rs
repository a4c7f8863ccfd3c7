//! Expert-parallel load balancing (EPLB, after DeepSeek-V3 §3.4 and DeepSeek's EPLB):
//! from per-expert load statistics, give heavy experts redundant replicas and place the
//! physical experts on GPUs so that every GPU gets about the same load.
//!
//! - [`LoadTracker`]: a moving average of the per-expert token counts a layer reports.
//! - [`rebalance`]: replicas and placement. Hierarchical when the nodes divide the expert
//!   groups (groups packed onto nodes, experts replicated within each node, physical
//!   experts packed onto the node's GPUs: group-limited routing keeps its traffic inside
//!   a node); global otherwise (replicated over all GPUs at once).
//! - [`Placement`]: the maps — physical → logical, logical → its physical replicas,
//!   replica counts, the GPU of a physical expert — and [`Placement::route`], which spreads
//!   a logical expert's tokens over its replicas.
//!
//! ```
//! use burn_moe::eplb::{rebalance, EplbConfig};
//!
//! // 8 experts, one very hot; 12 physical slots on 4 GPUs.
//! let load = [90.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0];
//! let placement = rebalance(&load, &EplbConfig { physical_experts: 12, groups: 1, nodes: 1, gpus: 4 }).unwrap();
//! assert_eq!(placement.replicas()[0], 5); // the hot expert gets the spare slots
//! assert!(placement.imbalance(&load) < 1.2); // max / mean GPU load
//! ```

use core::fmt;

/// The shape of the cluster and of the replica budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EplbConfig {
    /// Physical expert slots in all (logical experts plus redundant replicas); a multiple
    /// of `gpus`.
    pub physical_experts: usize,
    /// Expert groups of the router (group-limited routing); 1 for none.
    pub groups: usize,
    /// Nodes; the hierarchical policy applies when they divide `groups`.
    pub nodes: usize,
    /// GPUs in all; a multiple of `nodes`.
    pub gpus: usize,
}

/// Why a placement cannot be made.
#[derive(Clone, Debug, PartialEq)]
pub enum EplbError {
    /// A count that must divide another does not.
    NotDivisible {
        /// The dividend's name and value.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The divisor's name.
        by: &'static str,
        /// Its value.
        divisor: usize,
    },
    /// Fewer physical slots than logical experts: one would be dropped.
    TooFewSlots {
        /// Physical slots.
        physical: usize,
        /// Logical experts.
        logical: usize,
    },
    /// A slot holds an expert the layer does not have.
    UnknownExpert {
        /// The physical slot.
        slot: usize,
        /// The logical expert it names.
        expert: usize,
        /// Logical experts of the layer.
        logical: usize,
    },
    /// A logical expert has no slot: its tokens would have nowhere to go.
    Unplaced {
        /// The expert.
        expert: usize,
    },
    /// A load is negative or not finite.
    BadLoad {
        /// The expert.
        expert: usize,
        /// Its load.
        load: f64,
    },
}

impl fmt::Display for EplbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EplbError::NotDivisible { what, value, by, divisor } => write!(f, "{what} ({value}) is not a multiple of {by} ({divisor})"),
            EplbError::TooFewSlots { physical, logical } => write!(f, "{physical} physical expert slots cannot hold {logical} logical experts"),
            EplbError::UnknownExpert { slot, expert, logical } => write!(f, "physical slot {slot} holds expert {expert}, but there are {logical} logical experts"),
            EplbError::Unplaced { expert } => write!(f, "expert {expert} has no physical slot"),
            EplbError::BadLoad { expert, load } => write!(f, "expert {expert} has load {load}; loads must be finite and non-negative"),
        }
    }
}

impl std::error::Error for EplbError {}

/// Where the experts live: physical slot `p` is on GPU `p / (physical / gpus)`. Built by
/// [`rebalance`], [`Placement::identity`] or [`Placement::new`], which check that every
/// logical expert has a slot and the GPUs share the slots evenly.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// `[physical]`: the logical expert each slot holds.
    phys_to_log: Vec<usize>,
    /// `[logical][replica]`: the slots holding each logical expert, in slot order.
    log_to_phys: Vec<Vec<usize>>,
    /// `[logical]`: replicas of each expert (≥ 1).
    replicas: Vec<usize>,
    /// GPUs.
    gpus: usize,
}

impl Placement {
    /// The placement holding logical expert `phys_to_log[p]` in physical slot `p`, the
    /// slots split evenly over `gpus` in order; an expert in several slots is replicated.
    ///
    /// # Errors
    /// Slots not a multiple of `gpus` (or no GPUs), a slot naming an expert `≥ logical`,
    /// and a logical expert without a slot, each naming the values.
    pub fn new(phys_to_log: Vec<usize>, logical: usize, gpus: usize) -> Result<Self, EplbError> {
        divides("physical_experts", phys_to_log.len(), "gpus", gpus)?;
        if phys_to_log.len() < logical {
            return Err(EplbError::TooFewSlots { physical: phys_to_log.len(), logical });
        }
        let mut log_to_phys = vec![Vec::new(); logical];
        for (slot, &expert) in phys_to_log.iter().enumerate() {
            log_to_phys.get_mut(expert).ok_or(EplbError::UnknownExpert { slot, expert, logical })?.push(slot);
        }
        if let Some(expert) = log_to_phys.iter().position(Vec::is_empty) {
            return Err(EplbError::Unplaced { expert });
        }
        let replicas = log_to_phys.iter().map(Vec::len).collect();
        Ok(Self { phys_to_log, log_to_phys, replicas, gpus })
    }

    /// `[physical]`: the logical expert each slot holds.
    pub fn phys_to_log(&self) -> &[usize] {
        &self.phys_to_log
    }

    /// `[logical][replica]`: the slots holding each logical expert, in slot order.
    pub fn log_to_phys(&self) -> &[Vec<usize>] {
        &self.log_to_phys
    }

    /// `[logical]`: replicas of each expert (≥ 1).
    pub fn replicas(&self) -> &[usize] {
        &self.replicas
    }

    /// GPUs (expert-parallel ranks) the slots are split over.
    pub fn gpus(&self) -> usize {
        self.gpus
    }

    /// Physical slots in all.
    pub fn physical_experts(&self) -> usize {
        self.phys_to_log.len()
    }

    /// Logical experts.
    pub fn logical_experts(&self) -> usize {
        self.replicas.len()
    }

    /// Physical slots per GPU.
    pub fn slots_per_gpu(&self) -> usize {
        self.phys_to_log.len() / self.gpus
    }

    /// The GPU of physical slot `p`.
    pub fn gpu_of(&self, p: usize) -> usize {
        p / self.slots_per_gpu()
    }

    /// Load per GPU when each expert's load splits evenly over its replicas.
    pub fn gpu_loads(&self, load: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.gpus];
        for (p, &e) in self.phys_to_log.iter().enumerate() {
            out[self.gpu_of(p)] += load[e] / self.replicas[e] as f64;
        }
        out
    }

    /// Max over mean of [`Placement::gpu_loads`] (1 is perfect balance).
    pub fn imbalance(&self, load: &[f64]) -> f64 {
        ratio(&self.gpu_loads(load))
    }

    /// The physical slot serving `token`'s route to logical `expert`: the replicas take
    /// turns by token index.
    pub fn route(&self, expert: usize, token: usize) -> usize {
        let replicas = &self.log_to_phys[expert];
        replicas[token % replicas.len()]
    }

    /// The placement without replicas: expert `e` in slot `e` (contiguous blocks per GPU),
    /// as an expert-parallel layer places them before any rebalancing.
    ///
    /// # Errors
    /// As [`Placement::new`]: `gpus` must divide `experts`.
    pub fn identity(experts: usize, gpus: usize) -> Result<Self, EplbError> {
        Self::new((0..experts).collect(), experts, gpus)
    }
}

/// Max over mean (1 for all zeros).
fn ratio(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    if mean == 0.0 {
        1.0
    } else {
        values.iter().cloned().fold(0.0, f64::max) / mean
    }
}

/// A moving average of per-expert loads.
#[derive(Clone, Debug)]
pub struct LoadTracker {
    load: Vec<f64>,
    decay: f64,
    steps: usize,
}

impl LoadTracker {
    /// `experts` loads; each observation weighs `1 − decay` (the first is taken as is).
    pub fn new(experts: usize, decay: f64) -> Self {
        Self { load: vec![0.0; experts], decay, steps: 0 }
    }

    /// Adds one step's per-expert token counts.
    ///
    /// # Panics
    /// When `counts` does not have one entry per expert.
    pub fn observe(&mut self, counts: &[f64]) {
        assert_eq!(counts.len(), self.load.len(), "LoadTracker: {} counts for {} experts", counts.len(), self.load.len());
        let keep = if self.steps == 0 { 0.0 } else { self.decay };
        for (l, &c) in self.load.iter_mut().zip(counts) {
            *l = keep * *l + (1.0 - keep) * c;
        }
        self.steps += 1;
    }

    /// The averaged loads.
    pub fn load(&self) -> &[f64] {
        &self.load
    }
}

/// Splits `weights` into `packs` packs of `weights.len() / packs` items each, heaviest
/// first into the lightest pack with room. Returns each item's pack.
fn balanced_packing(weights: &[f64], packs: usize) -> Vec<usize> {
    let per_pack = weights.len() / packs;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let (mut totals, mut counts, mut pack_of) = (vec![0.0f64; packs], vec![0usize; packs], vec![0usize; weights.len()]);
    for item in order {
        let pack = (0..packs).filter(|&p| counts[p] < per_pack).min_by(|&a, &b| totals[a].total_cmp(&totals[b]).then(a.cmp(&b))).expect("a pack with room");
        pack_of[item] = pack;
        totals[pack] += weights[item];
        counts[pack] += 1;
    }
    pack_of
}

/// `slots` replicas over `weights.len()` experts: one each, then each spare slot to the
/// expert with the largest load per replica.
fn replicate(weights: &[f64], slots: usize) -> Vec<usize> {
    let mut count = vec![1usize; weights.len()];
    for _ in weights.len()..slots {
        let e = (0..weights.len()).max_by(|&a, &b| (weights[a] / count[a] as f64).total_cmp(&(weights[b] / count[b] as f64)).then(b.cmp(&a))).expect("experts");
        count[e] += 1;
    }
    count
}

fn divides(what: &'static str, value: usize, by: &'static str, divisor: usize) -> Result<(), EplbError> {
    if divisor == 0 || !value.is_multiple_of(divisor) {
        return Err(EplbError::NotDivisible { what, value, by, divisor });
    }
    Ok(())
}

/// Replicas and placement for per-expert `load` (one layer).
///
/// # Errors
/// [`EplbError`] naming the counts that do not divide, too few slots, or a bad load.
pub fn rebalance(load: &[f64], config: &EplbConfig) -> Result<Placement, EplbError> {
    let logical = load.len();
    if let Some((expert, &l)) = load.iter().enumerate().find(|(_, l)| !l.is_finite() || **l < 0.0) {
        return Err(EplbError::BadLoad { expert, load: l });
    }
    if config.physical_experts < logical {
        return Err(EplbError::TooFewSlots { physical: config.physical_experts, logical });
    }
    divides("physical experts", config.physical_experts, "gpus", config.gpus)?;
    divides("gpus", config.gpus, "nodes", config.nodes)?;
    divides("logical experts", logical, "groups", config.groups)?;
    // Hierarchical when the nodes divide the groups; else one node holding everything.
    // (`physical` ≥ `logical` and the divisibilities above give every node as many slots
    // as experts at least.)
    let (nodes, groups) = if config.groups.is_multiple_of(config.nodes) { (config.nodes, config.groups) } else { (1, 1) };
    let per_group = logical / groups;
    let slots_per_node = config.physical_experts / nodes;
    let gpus_per_node = config.gpus / nodes;

    // 1. Groups onto nodes.
    let group_load: Vec<f64> = (0..groups).map(|g| load[g * per_group..(g + 1) * per_group].iter().sum()).collect();
    let node_of_group = balanced_packing(&group_load, nodes);
    let mut phys_to_log = vec![0usize; config.physical_experts];
    let mut replicas = vec![0usize; logical];
    for node in 0..nodes {
        // 2. Replicas within the node.
        let experts: Vec<usize> = (0..groups).filter(|&g| node_of_group[g] == node).flat_map(|g| g * per_group..(g + 1) * per_group).collect();
        let weights: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
        let count = replicate(&weights, slots_per_node);
        let mut slots: Vec<(usize, f64)> = Vec::with_capacity(slots_per_node);
        for (i, &e) in experts.iter().enumerate() {
            replicas[e] = count[i];
            slots.extend((0..count[i]).map(|_| (e, load[e] / count[i] as f64)));
        }
        // 3. Physical experts onto the node's GPUs.
        let gpu_of_slot = balanced_packing(&slots.iter().map(|s| s.1).collect::<Vec<_>>(), gpus_per_node);
        let mut next = vec![0usize; gpus_per_node];
        let per_gpu = slots_per_node / gpus_per_node;
        for (slot, &(e, _)) in slots.iter().enumerate() {
            let gpu = gpu_of_slot[slot];
            phys_to_log[node * slots_per_node + gpu * per_gpu + next[gpu]] = e;
            next[gpu] += 1;
        }
    }
    let placement = Placement::new(phys_to_log, logical, config.gpus)?;
    debug_assert_eq!(placement.replicas, replicas);
    Ok(placement)
}
