//! burn-dualpipe: the schedules' invariants and bubbles.

mod executor;
mod schedule;
