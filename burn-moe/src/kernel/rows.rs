//! Row movement between token order `[T, d]` and expert-contiguous order `[T·k, d]`, as
//! gathers only (every output element is written by exactly one unit: no float atomics).
//!
//! - gather (dispatch): `out[r] = w[s] · x[s / k]` with `s = row_slots[r]`;
//! - combine: `out[t] = Σ_j w[t·k + j] · rows[positions[t·k + j]]`;
//! - gate gradient: `out[s] = ⟨a[s / k], rows[positions[s]]⟩`.
//!
//! Gather and combine are each other's adjoints; the gate gradient is the derivative of
//! either with respect to `w`. Without weights, `w = 1`.

use super::vector_width;
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use burn_fp8::codegen::{array, settings, CodegenTarget, KernelVariant};
use cubecl::prelude::*;

// Gather and combine give each output row to one cube, whose units stride over the
// row's vectors of `N` floats (4, 2 or 1, the widest dividing the width: lavapipe turns
// each per-unit read into a load per SIMD lane, so wider reads move more per load); the
// row's source index is read once and no unit divides by the width.

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gather_kernel<N: Size>(
    src: &Array<Vector<f32, N>>,
    row_slots: &Array<u32>,
    weights: &Array<f32>,
    out: &mut Array<Vector<f32, N>>,
    rows: usize,
    width: usize,
    top_k: usize,
    #[comptime] weighted: bool,
) {
    let r = CUBE_POS;
    if r >= rows {
        terminate!();
    }
    let vectors = width / N::value();
    let slot = row_slots[r] as usize;
    let s0 = (slot / top_k) * vectors;
    let o0 = r * vectors;
    let step = CUBE_DIM as usize;
    for l in 0..vectors.div_ceil(step) {
        let c = l * step + UNIT_POS as usize;
        if c < vectors {
            if comptime!(weighted) {
                out[o0 + c] = src[s0 + c] * Vector::new(weights[slot]);
            } else {
                out[o0 + c] = src[s0 + c];
            }
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn combine_kernel<N: Size>(
    src: &Array<Vector<f32, N>>,
    positions: &Array<u32>,
    weights: &Array<f32>,
    out: &mut Array<Vector<f32, N>>,
    rows: usize,
    width: usize,
    top_k: usize,
    #[comptime] weighted: bool,
) {
    let t = CUBE_POS;
    if t >= rows {
        terminate!();
    }
    let vectors = width / N::value();
    let o0 = t * vectors;
    let step = CUBE_DIM as usize;
    for l in 0..vectors.div_ceil(step) {
        let c = l * step + UNIT_POS as usize;
        if c < vectors {
            let mut acc = Vector::<f32, N>::new(0.0);
            for j in 0..top_k {
                let slot = t * top_k + j;
                let v = src[positions[slot] as usize * vectors + c];
                if comptime!(weighted) {
                    acc += v * Vector::new(weights[slot]);
                } else {
                    acc += v;
                }
            }
            out[o0 + c] = acc;
        }
    }
}

#[cube(launch)]
fn gate_grad_kernel<N: Size>(a: &Array<Vector<f32, N>>, rows: &Array<Vector<f32, N>>, positions: &Array<u32>, out: &mut Array<f32>, width: usize, top_k: usize) {
    let slot = ABSOLUTE_POS;
    if slot >= out.len() {
        terminate!();
    }
    let vectors = width / N::value();
    let a0 = (slot / top_k) * vectors;
    let r0 = positions[slot] as usize * vectors;
    let mut acc = Vector::<f32, N>::new(0.0);
    for c in 0..vectors {
        acc += a[a0 + c] * rows[r0 + c];
    }
    let mut sum = 0.0f32;
    #[unroll]
    for i in 0..N::value() {
        sum += acc[i];
    }
    out[slot] = sum;
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

/// Units per cube of the row movements (a cube per output row).
const ROW_UNITS: u32 = 64;

/// Launches `movement` over `src` with its plan index (`row_slots` for gather,
/// `positions` for combine); without weights the kernel's weight input is a dummy (`src`).
fn launch_movement<R: CubeRuntime>(movement: Movement, src: CubeTensor<R>, index: CubeTensor<R>, weights: Option<CubeTensor<R>>, out: CubeTensor<R>, top_k: usize) {
    let [rows, width] = [out.meta.shape()[0], out.meta.shape()[1]];
    if rows * width == 0 {
        return;
    }
    let client = src.client.clone();
    // One cube per row, spread over the grid's dimensions when rows exceed one of them.
    let count = cubecl::calculate_cube_count_elemwise(&client, rows, CubeDim::new_1d(1));
    let dim = CubeDim::new_1d(ROW_UNITS);
    let weighted = weights.is_some();
    let weights = weights.unwrap_or_else(|| src.clone());
    let vector = vector_width(&[width]);
    let (src, index, weights, out) = (src.into_array_arg(), index.into_array_arg(), weights.into_array_arg(), out.into_array_arg());
    match movement {
        Movement::Gather => gather_kernel::launch::<R>(&client, count, dim, vector, src, index, weights, out, rows, width, top_k, weighted),
        Movement::Combine => combine_kernel::launch::<R>(&client, count, dim, vector, src, index, weights, out, rows, width, top_k, weighted),
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
        vector_width(&[width]),
        a.into_array_arg(),
        rows.into_array_arg(),
        positions.into_array_arg(),
        out.into_array_arg(),
        width,
        top_k,
    );
}

/// The row kernels at every configuration their launchers choose: vectors of 4, 2 and 1
/// floats ([`super::vector_width`]), with and without weights.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for vector in [4, 2, 1] {
        for weighted in [false, true] {
            let gather =
                gather_kernel::GatherKernel::<R>::new(settings(CubeDim::new_1d(ROW_UNITS)), client.clone(), array(), array(), array(), array(), (), (), (), vector, weighted);
            out.push(KernelVariant::new("gather_kernel", (vector, weighted), gather));
            let combine =
                combine_kernel::CombineKernel::<R>::new(settings(CubeDim::new_1d(ROW_UNITS)), client.clone(), array(), array(), array(), array(), (), (), (), vector, weighted);
            out.push(KernelVariant::new("combine_kernel", (vector, weighted), combine));
        }
        let gate_grad = gate_grad_kernel::GateGradKernel::<R>::new(settings(target.elementwise_cube_dim()), client.clone(), array(), array(), array(), array(), (), (), vector);
        out.push(KernelVariant::new("gate_grad_kernel", vector, gate_grad));
    }
    out
}
