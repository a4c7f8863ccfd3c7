//! Row movement between token order `[T, d]` and expert-contiguous order `[T·k, d]`, as
//! gathers only (every output element is written by exactly one unit: no float atomics).
//!
//! - gather (dispatch): `out[r] = w[s] · x[s / k]` with `s = row_slots[r]`;
//! - combine: `out[t] = Σ_j w[t·k + j] · rows[positions[t·k + j]]`;
//! - gate gradient: `out[s] = ⟨a[s / k], rows[positions[s]]⟩`.
//!
//! Gather and combine are each other's adjoints; the gate gradient is the derivative of
//! either with respect to `w`. Without weights, `w = 1`.

use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

#[cube(launch)]
fn gather_kernel(
    src: &Array<f32>,
    row_slots: &Array<u32>,
    weights: &Array<f32>,
    out: &mut Array<f32>,
    width: usize,
    top_k: usize,
    #[comptime] weighted: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let slot = row_slots[i / width] as usize;
    let v = src[(slot / top_k) * width + i % width];
    if comptime!(weighted) {
        out[i] = v * weights[slot];
    } else {
        out[i] = v;
    }
}

#[cube(launch)]
fn combine_kernel(
    rows: &Array<f32>,
    positions: &Array<u32>,
    weights: &Array<f32>,
    out: &mut Array<f32>,
    width: usize,
    top_k: usize,
    #[comptime] weighted: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let t = i / width;
    let c = i % width;
    let mut acc = 0.0f32;
    for j in 0..top_k {
        let slot = t * top_k + j;
        let v = rows[positions[slot] as usize * width + c];
        if comptime!(weighted) {
            acc += v * weights[slot];
        } else {
            acc += v;
        }
    }
    out[i] = acc;
}

#[cube(launch)]
fn gate_grad_kernel(a: &Array<f32>, rows: &Array<f32>, positions: &Array<u32>, out: &mut Array<f32>, width: usize, top_k: usize) {
    let slot = ABSOLUTE_POS;
    if slot >= out.len() {
        terminate!();
    }
    let a0 = (slot / top_k) * width;
    let r0 = positions[slot] as usize * width;
    let mut acc = 0.0f32;
    for c in 0..width {
        acc += a[a0 + c] * rows[r0 + c];
    }
    out[slot] = acc;
}

fn elementwise<R: CubeRuntime>(out: &CubeTensor<R>) -> Option<(CubeCount, CubeDim)> {
    let n = out.meta.num_elements();
    if n == 0 {
        return None;
    }
    let cube_dim = CubeDim::new(&out.client, n);
    Some((cubecl::calculate_cube_count_elemwise(&out.client, n, cube_dim), cube_dim))
}

/// Gather (dispatch) or combine: the two row movements share their launch.
#[derive(Clone, Copy, Debug)]
enum Movement {
    Gather,
    Combine,
}

/// Launches `movement` over `src` with its plan index (`row_slots` for gather,
/// `positions` for combine); without weights the kernel's weight input is a dummy (`src`).
fn launch_movement<R: CubeRuntime>(movement: Movement, src: CubeTensor<R>, index: CubeTensor<R>, weights: Option<CubeTensor<R>>, out: CubeTensor<R>, top_k: usize) {
    let Some((count, dim)) = elementwise(&out) else { return };
    let client = src.client.clone();
    let width = out.meta.shape()[1];
    let weighted = weights.is_some();
    let weights = weights.unwrap_or_else(|| src.clone());
    let (src, index, weights, out) = (src.into_array_arg(), index.into_array_arg(), weights.into_array_arg(), out.into_array_arg());
    match movement {
        Movement::Gather => gather_kernel::launch::<R>(&client, count, dim, src, index, weights, out, width, top_k, weighted),
        Movement::Combine => combine_kernel::launch::<R>(&client, count, dim, src, index, weights, out, width, top_k, weighted),
    }
}

/// `out [R, d]` (contiguous f32) `= w[s] · src[s / top_k]`, `s = row_slots[r]`; `weights`
/// is `[T·k]` or `None` for 1.
pub fn launch_gather<R: CubeRuntime>(src: CubeTensor<R>, row_slots: CubeTensor<R>, weights: Option<CubeTensor<R>>, out: CubeTensor<R>, top_k: usize) {
    launch_movement(Movement::Gather, src, row_slots, weights, out, top_k);
}

/// `out [T, d]` (contiguous f32) `= Σ_j w[t·k + j] · rows[positions[t·k + j]]`.
pub fn launch_combine<R: CubeRuntime>(rows: CubeTensor<R>, positions: CubeTensor<R>, weights: Option<CubeTensor<R>>, out: CubeTensor<R>, top_k: usize) {
    launch_movement(Movement::Combine, rows, positions, weights, out, top_k);
}

/// `out [T·k]` (contiguous f32) `= ⟨a[s / top_k], rows[positions[s]]⟩`.
pub fn launch_gate_grad<R: CubeRuntime>(a: CubeTensor<R>, rows: CubeTensor<R>, positions: CubeTensor<R>, out: CubeTensor<R>, top_k: usize) {
    let Some((count, dim)) = elementwise(&out) else { return };
    let client = a.client.clone();
    let width = a.meta.shape()[1];
    gate_grad_kernel::launch::<R>(
        &client,
        count,
        dim,
        a.into_array_arg(),
        rows.into_array_arg(),
        positions.into_array_arg(),
        out.into_array_arg(),
        width,
        top_k,
    );
}
