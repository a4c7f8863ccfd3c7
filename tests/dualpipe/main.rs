//! burn-dualpipe: the schedules' invariants and bubbles.

mod schedule;
