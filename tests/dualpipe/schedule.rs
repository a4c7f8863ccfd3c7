//! The generated schedules keep their invariants, the simulator reproduces the bubble
//! formulas of DeepSeek-V3's Table 2, and bad input and broken programs get named errors.
//!
//! Table 2 (per rank, `PP` pipeline stages): 1F1B `(PP−1)(F+B)`, ZB1P `(PP−1)(F+B−2W)`,
//! DualPipe and DualPipeV `(PP/2−1)(F&B+B−3W)` (DualPipeV's `PP` is its `2P` stages on
//! `P` ranks). The formulas hold exactly when a forward takes as long as an
//! input-gradient backward (`F = B − W`, the setting they are derived in); otherwise
//! DualPipe's bubble can only be smaller, which the test checks as a bound.

use burn_dualpipe::schedule::{validate, Instr, Payload, Schedule, ScheduleError, ScheduleKind};
use burn_dualpipe::{simulate, Costs};

const EPS: f64 = 1e-9;

fn costs(forward: f64, backward: f64, weight: f64, forward_backward: f64) -> Costs {
    Costs { forward, backward, weight, forward_backward }
}

/// Table 2's bubble of `kind` on `ranks` ranks.
fn formula(kind: ScheduleKind, ranks: usize, c: &Costs) -> f64 {
    let stages = kind.stages(ranks) as f64;
    match kind {
        ScheduleKind::OneFOneB => (stages - 1.0) * (c.forward + c.backward),
        ScheduleKind::Zb1p => (stages - 1.0) * (c.forward + c.backward - 2.0 * c.weight),
        ScheduleKind::DualPipe | ScheduleKind::DualPipeV => (stages / 2.0 - 1.0) * (c.forward_backward + c.backward - 3.0 * c.weight),
    }
}

#[test]
fn every_schedule_validates() {
    for kind in ScheduleKind::ALL {
        for ranks in [1, 2, 3, 4, 6, 8] {
            if kind == ScheduleKind::DualPipe && ranks % 2 == 1 {
                continue;
            }
            let min = kind.min_micro_batches(ranks);
            for m in [min, min + 2, min + 6, 24.max(min)] {
                let s = Schedule::new(kind, ranks, m).unwrap_or_else(|e| panic!("{kind} P={ranks} M={m}: {e}"));
                validate(&s).unwrap_or_else(|e| panic!("{kind} P={ranks} M={m}: {e}"));
                let computes = s.programs.iter().flatten().filter(|i| i.is_compute()).count();
                assert!(computes >= m * s.stages(), "{kind} P={ranks} M={m}: {computes} computes");
            }
        }
    }
}

#[test]
fn simulated_bubbles_match_table_2() {
    // F = B − W: the formulas' setting, with and without an overlap gain in F&B.
    let exact = [costs(1.0, 2.0, 1.0, 3.0), costs(1.0, 2.0, 1.0, 2.5), costs(2.0, 3.0, 1.0, 4.0), costs(1.0, 1.5, 0.5, 2.0)];
    for kind in ScheduleKind::ALL {
        for ranks in [2, 4, 8] {
            let m = 2 * ranks + 8;
            let s = Schedule::new(kind, ranks, m).unwrap();
            for c in &exact {
                let t = simulate(&s, c).unwrap();
                let want = formula(kind, ranks, c);
                assert!((t.max_bubble() - want).abs() < EPS, "{kind} P={ranks} M={m} {c:?}: bubble {} vs Table 2's {want}", t.max_bubble());
                if kind == ScheduleKind::OneFOneB {
                    for r in 0..ranks {
                        assert!((t.bubble(r) - want).abs() < EPS, "1F1B rank {r}: {}", t.bubble(r));
                    }
                }
            }
            // Elsewhere the formula bounds DualPipe's bubble (and is exact for the others).
            let other = costs(1.5, 2.5, 0.75, 3.25);
            let t = simulate(&s, &other).unwrap();
            let want = formula(kind, ranks, &other);
            match kind {
                ScheduleKind::DualPipe | ScheduleKind::DualPipeV => assert!(t.max_bubble() <= want + EPS, "{kind} P={ranks}: {} > {want}", t.max_bubble()),
                _ => assert!((t.max_bubble() - want).abs() < EPS, "{kind} P={ranks}: {} vs {want}", t.max_bubble()),
            }
        }
    }
}

#[test]
fn dualpipe_halves_the_bubble_of_1f1b() {
    let c = costs(1.0, 2.0, 1.0, 2.5);
    for ranks in [4, 8] {
        let bubble = |kind| simulate(&Schedule::new(kind, ranks, 20).unwrap(), &c).unwrap().bubble_fraction();
        let (one, dual) = (bubble(ScheduleKind::OneFOneB), bubble(ScheduleKind::DualPipe));
        assert!(dual < one / 2.0, "P={ranks}: DualPipe bubble fraction {dual:.3} vs 1F1B {one:.3}");
    }
}

#[test]
fn bad_shapes_are_named() {
    assert_eq!(Schedule::new(ScheduleKind::DualPipe, 3, 12), Err(ScheduleError::OddRanks { ranks: 3 }));
    let err = Schedule::new(ScheduleKind::DualPipe, 4, 6).unwrap_err();
    assert_eq!(err.to_string(), "DualPipe needs an even number of and at least 8 micro-batches, got 6");
    assert!(matches!(Schedule::new(ScheduleKind::DualPipe, 4, 9), Err(ScheduleError::MicroBatches { micro_batches: 9, .. })));
    assert!(matches!(Schedule::new(ScheduleKind::DualPipeV, 4, 7), Err(ScheduleError::MicroBatches { min: 8, .. })));
    assert_eq!(Schedule::new(ScheduleKind::OneFOneB, 0, 4), Err(ScheduleError::NoRanks));
    assert!(Schedule::new(ScheduleKind::OneFOneB, 4, 0).is_err());
}

/// Rank and message of the validator's error for a schedule changed by `edit`.
fn broken(kind: ScheduleKind, edit: impl FnOnce(&mut Schedule)) -> (usize, String) {
    let mut s = Schedule::new(kind, 4, 8).unwrap();
    edit(&mut s);
    match validate(&s) {
        Err(ScheduleError::Invalid { rank, reason, .. }) => (rank, reason),
        other => panic!("expected an invalid schedule, got {other:?}"),
    }
}

#[test]
fn broken_programs_are_named() {
    // A dropped receive: the forward that needs it runs first.
    let (rank, why) = broken(ScheduleKind::OneFOneB, |s| {
        let i = s.programs[2].iter().position(|i| matches!(i, Instr::Recv { payload: Payload::Activation, .. })).unwrap();
        s.programs[2].remove(i);
    });
    assert_eq!(rank, 2);
    assert!(why.contains("before its Activation") && why.contains("is received"), "{why}");

    // A weight step before its input-gradient step.
    let (rank, why) = broken(ScheduleKind::Zb1p, |s| {
        let w = s.programs[1].iter().position(|i| matches!(i, Instr::BackwardWeight(_))).unwrap();
        let instr = s.programs[1].remove(w);
        s.programs[1].insert(0, instr);
    });
    assert_eq!(rank, 1);
    assert!(why.contains("Weight") && why.contains("before its Input"), "{why}");

    // A micro-batch run twice, and one never run.
    let (_, why) = broken(ScheduleKind::DualPipe, |s| {
        let f = s.programs[0].iter().position(|i| matches!(i, Instr::Forward(_))).unwrap();
        let instr = s.programs[0][f];
        s.programs[0].insert(f, instr);
    });
    assert!(why.contains("again"), "{why}");

    // A receive moved ahead of the forward whose output its sender waits for: deadlock.
    let (rank, why) = broken(ScheduleKind::OneFOneB, |s| {
        let i = s.programs[0].iter().position(|i| matches!(i, Instr::Recv { payload: Payload::Gradient, .. })).unwrap();
        let instr = s.programs[0].remove(i);
        s.programs[0].insert(0, instr);
    });
    assert!(why.contains("deadlock"), "rank {rank}: {why}");
}

#[test]
fn timeline_draws_every_rank() {
    let s = Schedule::new(ScheduleKind::DualPipe, 4, 10).unwrap();
    let t = simulate(&s, &costs(1.0, 2.0, 1.0, 2.5)).unwrap();
    let svg = t.to_svg("DualPipe 4×10");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for r in 0..4 {
        assert!(svg.contains(&format!("rank {r}")), "rank {r}'s label");
    }
    // The passes' boxes and the legend's keys are the rectangles in the passes' colors.
    let boxes: usize = ["#4E79A7", "#59A14F", "#8CD17D", "#76B7B2"].iter().map(|c| svg.matches(&format!("fill=\"{c}\"")).count()).sum();
    let computes: usize = t.ranks.iter().map(|r| r.len()).sum();
    let pairs = t.ranks.iter().flatten().filter(|s| matches!(s.instr, Instr::ForwardBackward { .. })).count();
    assert_eq!(boxes, computes + pairs + 5, "one box per pass (two per F&B) plus the legend's five");
}
