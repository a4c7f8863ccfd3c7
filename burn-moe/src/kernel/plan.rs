//! The dispatch plan: where each routed (token, slot) pair lands in expert-contiguous
//! order, computed on the device from the routing indices and per-expert counts.
//!
//! One unit per expert: it sums the counts of the experts before it (its offset), then
//! walks the slots in token order and hands out consecutive rows to those routed to it.
//! Rows of an expert are therefore ordered by token, on every backend, and no slot is
//! written twice. Work is `O(E · T·k)` spread over `E` units, with no atomics.

use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use burn_fp8::codegen::{array, settings, CodegenTarget, KernelVariant};
use cubecl::prelude::*;

#[cube(launch)]
fn plan_kernel(indices: &Array<u32>, counts: &Array<u32>, positions: &mut Array<u32>, row_slots: &mut Array<u32>, offsets: &mut Array<u32>, n_experts: usize) {
    let e = ABSOLUTE_POS;
    if e >= n_experts {
        terminate!();
    }
    let mut base = 0u32;
    for i in 0..e {
        base += counts[i];
    }
    let end = base + counts[e];
    if e == 0 {
        offsets[0] = 0u32;
    }
    offsets[e + 1] = end;
    let expert = e as u32;
    let mut row = base;
    for s in 0..indices.len() {
        if indices[s] == expert && row < end {
            positions[s] = row;
            row_slots[row as usize] = s as u32;
            row += 1;
        }
    }
}

/// Fills `positions [S]`, `row_slots [S]` and `offsets [E + 1]` (all u32, contiguous) from
/// the flat expert `indices [S]` and `counts [E]` (u32). Counts must be those of the
/// indices (the router computes both); slots of out-of-range experts are not written.
pub fn launch_plan<R: CubeRuntime>(indices: CubeTensor<R>, counts: CubeTensor<R>, positions: CubeTensor<R>, row_slots: CubeTensor<R>, offsets: CubeTensor<R>) {
    let client = indices.client.clone();
    let n_experts = counts.meta.shape()[0];
    if n_experts == 0 {
        return;
    }
    let cube_dim = CubeDim::new(&client, n_experts);
    let cube_count = cubecl::calculate_cube_count_elemwise(&client, n_experts, cube_dim);
    plan_kernel::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        indices.into_array_arg(),
        counts.into_array_arg(),
        positions.into_array_arg(),
        row_slots.into_array_arg(),
        offsets.into_array_arg(),
        n_experts,
    );
}

/// The dispatch-plan kernel as [`launch_plan`] launches it on `target` (one variant: it
/// has no configuration).
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let kernel = plan_kernel::PlanKernel::<R>::new(settings(target.elementwise_cube_dim()), client.clone(), array(), array(), array(), array(), array(), ());
    vec![KernelVariant::new("plan_kernel", (), kernel)]
}
