//! Per-rank timelines — simulated ([`crate::simulate`]) or measured (the executor) — their
//! bubbles, and a drawing as SVG.

use crate::schedule::{Instr, Task};
use std::fmt::Write;

/// One instruction's interval on a rank, in seconds (simulated units or wall time).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    /// Start.
    pub start: f64,
    /// End.
    pub end: f64,
    /// What ran.
    pub instr: Instr,
}

/// The compute intervals of every rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// `ranks[r]`: rank `r`'s compute spans in start order.
    pub ranks: Vec<Vec<Span>>,
}

impl Timeline {
    /// From the first start to the last end over all ranks.
    pub fn makespan(&self) -> f64 {
        let start = self.ranks.iter().flatten().map(|s| s.start).fold(f64::INFINITY, f64::min);
        let end = self.ranks.iter().flatten().map(|s| s.end).fold(f64::NEG_INFINITY, f64::max);
        if end > start {
            end - start
        } else {
            0.0
        }
    }

    /// Time rank `r` computes.
    pub fn busy(&self, rank: usize) -> f64 {
        self.ranks[rank].iter().map(|s| s.end - s.start).sum()
    }

    /// Time rank `r` is idle within the makespan: its bubble.
    pub fn bubble(&self, rank: usize) -> f64 {
        self.makespan() - self.busy(rank)
    }

    /// The largest bubble over the ranks.
    pub fn max_bubble(&self) -> f64 {
        (0..self.ranks.len()).map(|r| self.bubble(r)).fold(0.0, f64::max)
    }

    /// Idle share of all ranks' time: `Σ bubble / (ranks · makespan)`.
    pub fn bubble_fraction(&self) -> f64 {
        let total = self.makespan() * self.ranks.len() as f64;
        if total == 0.0 {
            return 0.0;
        }
        (0..self.ranks.len()).map(|r| self.bubble(r)).sum::<f64>() / total
    }

    /// The timeline drawn as an SVG image: one row per rank, forward passes in blue,
    /// full backwards in green, input-gradient backwards in light green, weight-gradient
    /// steps in teal, overlapped forward-and-backward pairs as a box split in blue and
    /// green; each box is labelled with its micro-batch.
    pub fn to_svg(&self, title: &str) -> String {
        let (width, row, left, top) = (1200.0, 28.0, 70.0, 40.0);
        let makespan = self.makespan().max(f64::MIN_POSITIVE);
        let origin = self.ranks.iter().flatten().map(|s| s.start).fold(f64::INFINITY, f64::min);
        let origin = if origin.is_finite() { origin } else { 0.0 };
        let scale = (width - left - 10.0) / makespan;
        let height = top + row * self.ranks.len() as f64 + 40.0;
        let mut svg = String::new();
        let _ = writeln!(svg, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">"#);
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">{}</text>"#, escape(title));
        for (r, spans) in self.ranks.iter().enumerate() {
            let y = top + r as f64 * row;
            let _ = writeln!(svg, r#"<text x="4" y="{}">rank {r}</text>"#, y + row * 0.6);
            for span in spans {
                let x = left + (span.start - origin) * scale;
                let w = ((span.end - span.start) * scale).max(0.5);
                let boxes: Vec<(&str, Task, f64)> = match span.instr {
                    Instr::Forward(t) => vec![("#4e79a7", t, 1.0)],
                    Instr::Backward(t) => vec![("#59a14f", t, 1.0)],
                    Instr::BackwardInput(t) => vec![("#8cd17d", t, 1.0)],
                    Instr::BackwardWeight(t) => vec![("#76b7b2", t, 1.0)],
                    Instr::ForwardBackward { forward, backward } => vec![("#4e79a7", forward, 0.5), ("#59a14f", backward, 0.5)],
                    _ => vec![],
                };
                let mut bx = x;
                for (color, task, share) in boxes {
                    let bw = w * share;
                    let _ = writeln!(
                        svg,
                        r##"<rect x="{bx:.2}" y="{:.2}" width="{bw:.2}" height="{:.2}" fill="{color}" stroke="#333" stroke-width="0.5"><title>{:?}</title></rect>"##,
                        y + 2.0,
                        row - 4.0,
                        span.instr
                    );
                    if bw > 12.0 {
                        let _ = writeln!(svg, r#"<text x="{:.2}" y="{:.2}" fill="white">{}</text>"#, bx + 2.0, y + row * 0.6, task.micro_batch);
                    }
                    bx += bw;
                }
            }
        }
        let legend_y = top + row * self.ranks.len() as f64 + 20.0;
        for (i, (color, name)) in [("#4e79a7", "F"), ("#59a14f", "B (full)"), ("#8cd17d", "B (input)"), ("#76b7b2", "W"), ("#4e79a7", "F&B: F half + B half")].iter().enumerate() {
            let x = left + i as f64 * 180.0;
            let _ = writeln!(svg, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{name}</text>"#, legend_y - 10.0, x + 16.0, legend_y);
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
