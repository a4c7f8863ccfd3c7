//! The four pipeline schedules, generated, validated and simulated: prints each one's
//! bubble against Table 2 of the DeepSeek-V3 report and writes its timeline as SVG.
//!
//! ```text
//! cargo run --release --example dualpipe_schedules
//! cargo run --release --example dualpipe_schedules -- --ranks 4 --micro-batches 10 --out /tmp/pp
//! ```
//!
//! Pass times default to `F = 1, B = 2, W = 1, F&B = 2.5` (a backward twice a forward,
//! half of it weight gradient, and overlapping a forward with a backward saving half a
//! forward); `--costs F,B,W,FB` sets others.

use burn_dualpipe::schedule::{validate, Schedule, ScheduleKind};
use burn_dualpipe::{simulate, Costs};
use std::path::PathBuf;

fn main() {
    let (mut ranks, mut micro_batches, mut out) = (8usize, 20usize, PathBuf::from("target/dualpipe"));
    let mut costs = Costs { forward: 1.0, backward: 2.0, weight: 1.0, forward_backward: 2.5 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--ranks" => ranks = value().parse().expect("rank count"),
            "--micro-batches" => micro_batches = value().parse().expect("micro-batch count"),
            "--out" => out = value().into(),
            "--costs" => {
                let v: Vec<f64> = value().split(',').map(|x| x.parse().expect("a time")).collect();
                assert_eq!(v.len(), 4, "--costs takes F,B,W,FB");
                costs = Costs { forward: v[0], backward: v[1], weight: v[2], forward_backward: v[3] };
            }
            "--help" | "-h" => {
                println!("dualpipe_schedules [--ranks P] [--micro-batches M] [--costs F,B,W,FB] [--out DIR]");
                return;
            }
            other => panic!("unknown flag {other}; see --help"),
        }
    }
    std::fs::create_dir_all(&out).expect("output directory");
    println!("{ranks} ranks, {micro_batches} micro-batches, {costs:?}");
    println!("{:>10} | {:>7} | {:>9} | {:>11} | {:>13} | {:>8}", "schedule", "stages", "makespan", "max bubble", "Table 2 bound", "idle");
    for kind in ScheduleKind::ALL {
        let schedule = match Schedule::new(kind, ranks, micro_batches) {
            Ok(s) => s,
            Err(e) => {
                println!("{:>10} | {e}", kind.to_string());
                continue;
            }
        };
        validate(&schedule).expect("generated schedules are valid");
        let timeline = simulate(&schedule, &costs).expect("valid schedules do not deadlock");
        let stages = kind.stages(ranks) as f64;
        let (c, f, b, w) = (costs.forward_backward, costs.forward, costs.backward, costs.weight);
        let table = match kind {
            ScheduleKind::OneFOneB => (stages - 1.0) * (f + b),
            ScheduleKind::Zb1p => (stages - 1.0) * (f + b - 2.0 * w),
            _ => (stages / 2.0 - 1.0) * (c + b - 3.0 * w),
        };
        println!(
            "{:>10} | {:>7} | {:>9.2} | {:>11.2} | {:>13.2} | {:>7.1}%",
            kind.to_string(),
            kind.stages(ranks),
            timeline.makespan(),
            timeline.max_bubble(),
            table,
            100.0 * timeline.bubble_fraction()
        );
        let name = kind.to_string().to_lowercase();
        let path = out.join(format!("{name}-{ranks}x{micro_batches}.svg"));
        let title = format!("{kind}: {ranks} ranks, {micro_batches} micro-batches (simulated, F=1 B=2 W=1 F&B=2.5 units)");
        std::fs::write(&path, timeline.to_svg(&title)).expect("write the SVG");
    }
    println!("idle = Σ bubbles / (ranks · makespan); timelines written to {}", out.display());
}
