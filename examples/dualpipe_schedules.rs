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
use clap::Parser;
use std::path::PathBuf;

#[path = "common/flags.rs"]
mod flags;
use flags::at_least_one;

/// Every pipeline schedule's program for `--ranks` ranks, validated, simulated and drawn.
#[derive(Parser, Debug)]
struct Args {
    /// Pipeline ranks.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    ranks: usize,
    /// Micro-batches per step.
    #[arg(long = "micro-batches", default_value_t = 20, value_parser = at_least_one)]
    micro_batches: usize,
    /// Pass times F,B,W,FB (forward, input backward, weight backward, overlapped forward and backward).
    #[arg(long, default_value = "1,2,1,2.5", value_parser = pass_costs, allow_hyphen_values = true)]
    costs: Costs,
    /// Output directory (SVG timelines).
    #[arg(long, default_value = "target/dualpipe")]
    out: PathBuf,
}

/// `F,B,W,FB`: four non-negative finite times.
fn pass_costs(s: &str) -> Result<Costs, String> {
    let v: Vec<f64> = s.split(',').map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}"))).collect::<Result<_, _>>()?;
    match v[..] {
        [forward, backward, weight, forward_backward] if v.iter().all(|t| t.is_finite() && *t >= 0.0) => Ok(Costs { forward, backward, weight, forward_backward }),
        _ => Err(format!("{s:?}: four non-negative times F,B,W,FB")),
    }
}

fn main() {
    let Args { ranks, micro_batches, costs, out } = Args::parse();
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
