//! EPLB: replicas lower the max/mean GPU load of skewed loads, never drop an expert, keep
//! the maps consistent, keep a node's experts within its groups (hierarchical policy);
//! routing spreads tokens over replicas; the load tracker averages; bad shapes are named.

use super::common::Rng;
use burn_moe::eplb::{rebalance, EplbConfig, EplbError, LoadTracker, Placement};

fn skewed(rng: &mut Rng, experts: usize) -> Vec<f64> {
    // Zipf-like: a few hot experts, shuffled.
    let mut load: Vec<f64> = (0..experts).map(|i| 1000.0 / (i as f64 + 1.0).powf(1.2) + rng.below(10) as f64).collect();
    for i in (1..experts).rev() {
        load.swap(i, rng.below(i + 1));
    }
    load
}

fn consistent(p: &Placement, logical: usize, physical: usize) {
    assert_eq!(p.physical_experts(), physical);
    assert_eq!(p.replicas().iter().sum::<usize>(), physical);
    for e in 0..logical {
        assert!(p.replicas()[e] >= 1, "expert {e} dropped");
        assert_eq!(p.log_to_phys()[e].len(), p.replicas()[e]);
        for &s in &p.log_to_phys()[e] {
            assert_eq!(p.phys_to_log()[s], e);
        }
    }
}

#[test]
fn replicas_balance_skewed_loads_globally_and_hierarchically() {
    let mut rng = Rng::new("replicas_balance_skewed_loads_globally_and_hierarchically");
    for (logical, config) in [
        (64, EplbConfig { physical_experts: 80, groups: 1, nodes: 1, gpus: 8 }),
        (64, EplbConfig { physical_experts: 80, groups: 8, nodes: 2, gpus: 8 }),
        (48, EplbConfig { physical_experts: 56, groups: 6, nodes: 4, gpus: 8 }),    // 4 ∤ 6: global
        (64, EplbConfig { physical_experts: 64, groups: 8, nodes: 4, gpus: 8 }),    // no spare slots
        (256, EplbConfig { physical_experts: 288, groups: 8, nodes: 4, gpus: 32 }), // DeepSeek-V3's 256 experts
    ] {
        let load = skewed(&mut rng, logical);
        let p = rebalance(&load, &config).unwrap();
        consistent(&p, logical, config.physical_experts);
        let before = Placement::identity(logical, config.gpus).unwrap().imbalance(&load);
        let after = p.imbalance(&load);
        eprintln!("{logical} experts, {config:?}: GPU max/mean load {before:.2} -> {after:.2}");
        assert!(after < before, "{config:?}: max/mean {after:.3} not below {before:.3}");
        if config.physical_experts > logical && config.groups % config.nodes != 0 {
            assert!(after < 1.3, "{config:?}: max/mean {after:.3}");
        }
        // Hierarchical: a node's slots hold experts of whole groups.
        if config.groups % config.nodes == 0 {
            let per_node = config.physical_experts / config.nodes;
            let per_group = logical / config.groups;
            for node in 0..config.nodes {
                let mut groups: Vec<usize> = p.phys_to_log()[node * per_node..(node + 1) * per_node].iter().map(|e| e / per_group).collect();
                groups.sort();
                groups.dedup();
                assert_eq!(groups.len(), config.groups / config.nodes, "{config:?}: node {node} holds groups {groups:?}");
            }
        }
    }
}

#[test]
fn routing_spreads_tokens_over_replicas() {
    let load = [90.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0];
    let p = rebalance(&load, &EplbConfig { physical_experts: 12, groups: 1, nodes: 1, gpus: 4 }).unwrap();
    let mut hits = [0usize; 12];
    for token in 0..100 {
        let slot = p.route(0, token);
        assert_eq!(p.phys_to_log()[slot], 0);
        hits[slot] += 1;
    }
    for &s in &p.log_to_phys()[0] {
        assert_eq!(hits[s], 20, "each of the 5 replicas serves a fifth");
    }
}

#[test]
fn tracker_averages_and_bad_input_is_named() {
    let mut t = LoadTracker::new(2, 0.5);
    t.observe(&[4.0, 0.0]);
    t.observe(&[0.0, 4.0]);
    assert_eq!(t.load(), &[2.0, 2.0]);
    let cfg = |physical, groups, nodes, gpus| EplbConfig { physical_experts: physical, groups, nodes, gpus };
    assert_eq!(rebalance(&[1.0; 8], &cfg(6, 1, 1, 2)).unwrap_err(), EplbError::TooFewSlots { physical: 6, logical: 8 });
    assert!(matches!(rebalance(&[1.0; 8], &cfg(10, 1, 1, 4)), Err(EplbError::NotDivisible { value: 10, divisor: 4, .. })));
    assert!(matches!(rebalance(&[1.0; 8], &cfg(8, 3, 1, 4)), Err(EplbError::NotDivisible { value: 8, divisor: 3, .. })));
    assert!(matches!(rebalance(&[1.0; 8], &cfg(8, 1, 3, 4)), Err(EplbError::NotDivisible { value: 4, divisor: 3, .. })));
    assert_eq!(rebalance(&[1.0, f64::NAN], &cfg(2, 1, 1, 1)).unwrap_err().to_string(), "expert 1 has load NaN; loads must be finite and non-negative");
}

#[test]
fn a_placement_is_checked_when_made() {
    // Slots 0..6 over 2 GPUs: expert 1 twice (slots 1 and 4).
    let p = Placement::new(vec![0, 1, 2, 3, 1, 4], 5, 2).unwrap();
    assert_eq!(p.replicas(), &[1, 2, 1, 1, 1]);
    assert_eq!(p.log_to_phys()[1], vec![1, 4]);
    assert_eq!((p.physical_experts(), p.logical_experts(), p.gpus(), p.slots_per_gpu()), (6, 5, 2, 3));
    assert_eq!((p.gpu_of(2), p.gpu_of(3)), (0, 1));
    assert_eq!((p.route(1, 0), p.route(1, 1), p.route(1, 2)), (1, 4, 1), "replicas take turns by token");
    assert_eq!(Placement::new(vec![0, 1, 2, 3, 1, 4], 6, 2).unwrap_err(), EplbError::Unplaced { expert: 5 });
    assert_eq!(Placement::new(vec![0, 1, 2, 7], 4, 2).unwrap_err(), EplbError::UnknownExpert { slot: 3, expert: 7, logical: 4 });
    assert_eq!(Placement::new(vec![0, 1, 2], 3, 2).unwrap_err().to_string(), "physical_experts (3) is not a multiple of gpus (2)");
    assert!(matches!(Placement::identity(16, 0), Err(EplbError::NotDivisible { value: 16, divisor: 0, .. })));
    assert_eq!(Placement::new(vec![0, 1], 3, 1).unwrap_err(), EplbError::TooFewSlots { physical: 2, logical: 3 });
}
