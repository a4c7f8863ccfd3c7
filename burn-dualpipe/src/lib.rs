//! # burn-dualpipe
//!
//! Pipeline parallelism for Burn after DeepSeek-V3's DualPipe (technical report §3.2.1):
//!
//! - [`schedule`]: DualPipe, DualPipeV, 1F1B and ZB1P generated as data — per-rank
//!   instruction lists of forwards, backwards (full, input-gradient, deferred
//!   weight-gradient), overlapped forward-and-backward pairs, sends and receives — and
//!   [`schedule::validate`], which checks their invariants;
//! - [`simulate()`]: the cost simulator, per-rank [`Timeline`]s and bubbles from pass
//!   times, drawn as SVG ([`Timeline::to_svg`]);
//! - [`executor`]: [`executor::Pipeline`] runs any schedule over several Burn devices,
//!   one thread per rank, and returns the loss, every chunk's gradients and the measured
//!   timeline; a rank that panics or stalls ends the step with an error naming it;
//!   [`predict()`] replays a measured run's compute times with instant communication, and
//!   [`Costs::measured`] averages its pass times, to set the measured bubbles against the
//!   simulator's.
//!
//! ```
//! use burn_dualpipe::schedule::{validate, Schedule, ScheduleKind};
//! use burn_dualpipe::{simulate, Costs};
//!
//! let schedule = Schedule::new(ScheduleKind::DualPipe, 8, 20).unwrap();
//! validate(&schedule).unwrap();
//! let timeline = simulate(&schedule, &Costs::unit()).unwrap();
//! assert!(timeline.bubble_fraction() < 0.25);
//! let _svg = timeline.to_svg("DualPipe, 8 ranks, 20 micro-batches");
//! ```
#![warn(missing_docs)]

pub mod executor;
pub mod schedule;
mod simulate;
mod timeline;

pub use simulate::{predict, simulate, Costs};
pub use timeline::{Span, Timeline};
