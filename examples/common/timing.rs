//! Timing helpers shared by the benchmark examples (included with `#[path]`).

use burn::tensor::backend::Backend;
use std::time::{Duration, Instant};

/// Mean time of `f` over at least 3 runs and `min_time` (and at most `max_runs`), after
/// one warm-up run. What `f` returns is kept until the device is synced: a fused backend
/// may skip work whose result is dropped unread, which would time nothing.
pub fn time<B: Backend, T>(device: &B::Device, min_time: Duration, max_runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let kept = f();
    B::sync(device).expect("device sync");
    drop(kept);
    let start = Instant::now();
    let mut runs = 0u32;
    while (runs < 3 || start.elapsed() < min_time) && (runs as usize) < max_runs.max(3) {
        let kept = f();
        B::sync(device).expect("device sync");
        drop(kept);
        runs += 1;
    }
    start.elapsed() / runs
}

/// Like [`time`], for a step that needs a fresh state from `prepare` (untimed) each run;
/// the first run warms up.
#[allow(dead_code)]
pub fn time_step<B: Backend, S, T>(device: &B::Device, min_time: Duration, mut prepare: impl FnMut() -> S, mut step: impl FnMut(S) -> T) -> Duration {
    let (mut total, mut runs) = (Duration::ZERO, 0u32);
    let start = Instant::now();
    while runs < 4 || start.elapsed() < 2 * min_time {
        let state = prepare();
        B::sync(device).expect("device sync");
        let begin = Instant::now();
        let kept = step(state);
        B::sync(device).expect("device sync");
        if runs > 0 {
            total += begin.elapsed();
        }
        drop(kept);
        runs += 1;
    }
    total / (runs - 1)
}
