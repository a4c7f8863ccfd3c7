//! Per-rank timelines — simulated ([`crate::simulate`]) or measured (the executor) — their
//! bubbles, and a drawing as SVG (plotters).

use crate::schedule::{Instr, Task};

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

    /// The timeline drawn as an SVG image (plotters): one row per rank, forward passes in
    /// blue, full backwards in green, input-gradient backwards in light green,
    /// weight-gradient steps in teal, overlapped forward-and-backward pairs as a box split
    /// in blue and green; each box wide enough is labelled with its micro-batch.
    pub fn to_svg(&self, title: &str) -> String {
        let mut svg = String::new();
        if let Err(e) = self.draw(&mut svg, title) {
            // Drawing into a string fails only on a plotters bug: say so in the image.
            svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\"><text x=\"4\" y=\"16\">timeline not drawn: {e}</text></svg>\n");
        }
        svg
    }

    fn draw(&self, svg: &mut String, title: &str) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        let ranks = self.ranks.len().max(1) as i32;
        let makespan = self.makespan().max(f64::MIN_POSITIVE);
        let origin = self.ranks.iter().flatten().map(|s| s.start).fold(f64::INFINITY, f64::min);
        let origin = if origin.is_finite() { origin } else { 0.0 };
        let root = SVGBackend::with_string(svg, (1200, 90 + 28 * ranks as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("monospace", 14))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..makespan, (0..ranks).into_segmented())?;
        // Rank 0 on top: segment `ranks - 1 - r` holds rank `r`.
        chart
            .configure_mesh()
            .disable_mesh()
            .y_labels(ranks as usize)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < ranks => format!("rank {}", ranks - 1 - i),
                _ => String::new(),
            })
            .x_desc("time (the spans' unit: seconds when measured)")
            .label_style(("monospace", 10))
            .draw()?;
        let row = |r: usize| {
            let i = ranks - 1 - r as i32;
            (SegmentValue::Exact(i), if i + 1 == ranks { SegmentValue::Last } else { SegmentValue::Exact(i + 1) })
        };
        let (f, b, bi, w) = (RGBColor(0x4e, 0x79, 0xa7), RGBColor(0x59, 0xa1, 0x4f), RGBColor(0x8c, 0xd1, 0x7d), RGBColor(0x76, 0xb7, 0xb2));
        // Each pass as a box, by kind (F, B, B input, W, F&B); an F&B pair as two halves.
        let mut kinds: [Vec<PassBox>; 5] = Default::default();
        for (r, spans) in self.ranks.iter().enumerate() {
            for span in spans {
                let (x0, x1) = (span.start - origin, span.end - origin);
                let mid = (x0 + x1) / 2.0;
                let mut push = |kind: usize, color, t: Task, start, end| kinds[kind].push(PassBox { color, micro_batch: t.micro_batch, start, end, rank: r });
                match span.instr {
                    Instr::Forward(t) => push(0, f, t, x0, x1),
                    Instr::Backward(t) => push(1, b, t, x0, x1),
                    Instr::BackwardInput(t) => push(2, bi, t, x0, x1),
                    Instr::BackwardWeight(t) => push(3, w, t, x0, x1),
                    Instr::ForwardBackward { forward, backward } => {
                        push(4, f, forward, x0, mid);
                        push(4, b, backward, mid, x1);
                    }
                    _ => {}
                }
            }
        }
        let per_pixel = makespan / 1100.0;
        for (boxes, (name, color)) in kinds.iter().zip([("F", f), ("B (full)", b), ("B (input)", bi), ("W", w), ("F&B: F half + B half", f)]) {
            let rects = boxes.iter().map(|p| {
                let (lo, hi) = row(p.rank);
                Rectangle::new([(p.start, lo), (p.end.max(p.start + per_pixel / 2.0), hi)], ShapeStyle { color: p.color.to_rgba(), filled: true, stroke_width: 1 })
            });
            chart.draw_series(rects)?.label(name).legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
            let labels = boxes.iter().filter(|p| (p.end - p.start) / per_pixel > 12.0).map(|p| {
                let i = ranks - 1 - p.rank as i32;
                Text::new(p.micro_batch.to_string(), (p.start + 2.0 * per_pixel, SegmentValue::CenterOf(i)), ("monospace", 10).into_font().color(&WHITE))
            });
            chart.draw_series(labels)?;
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.9)).border_style(BLACK).label_font(("monospace", 10)).draw()?;
        root.present()?;
        Ok(())
    }
}

/// One drawn box of [`Timeline::to_svg`]: a pass (or half of an F&B pair) on a rank.
struct PassBox {
    color: plotters::style::RGBColor,
    micro_batch: usize,
    /// Seconds from the timeline's first start.
    start: f64,
    end: f64,
    rank: usize,
}
