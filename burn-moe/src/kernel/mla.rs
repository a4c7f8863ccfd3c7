//! Absorbed MLA decode over a paged latent cache: for each sequence and head,
//! `softmax(q · rowsᵀ) · rows[:, ..kv_lora]` over the sequence's cached rows (`c_kv ‖
//! k_rope`, `C` values each), split over the KV pages with a final combine.
//!
//! - `mla_split_kernel`: a cube per (sequence, group of [`HEADS`] heads, split). Its 64
//!   units are the 64 tokens of a page: each scores its token for the group's heads from
//!   the queries staged in shared memory and the page's rows staged 32 columns at a time
//!   (each row read once for all heads); a max and a
//!   sum over the page (shared-memory tree) update each head's running max and
//!   denominator (online softmax); then each unit accumulates `kv_lora / 64` value
//!   columns of every head over the page's tokens (consecutive units, consecutive
//!   columns). It writes the unnormalised partial output and its (max, sum).
//! - `mla_combine_kernel`: a cube per (sequence, head) rescales the splits' partials to
//!   their common max and divides by the total denominator.
//!
//! A page is [`PAGE`] rows of the cache; `pages [n, P]` lists each sequence's pages in
//! order and `lens [n]` its tokens. Scores are finite: masked and empty use `-3e38`.

use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use burn_fp8::codegen::{array, settings, CodegenTarget, KernelVariant};
use cubecl::prelude::*;

/// Rows per page of the latent cache (DeepSeek's FlashMLA uses 64).
pub const PAGE: usize = 64;
/// Heads per cube: each cached row is read once for this many heads.
pub const HEADS: usize = 8;
const NEG: f32 = -3.0e38;
/// Columns of a page staged per step of the scoring loop.
const KCHUNK: usize = 32;
/// The widest cached row the kernel takes (DeepSeek-V3: 512 + 64).
pub const MAX_WIDTH: usize = 576;

/// Max (`op = 0`) or sum (`op = 1`) over the 64 units of `red[h·64 ..]` for every head,
/// by halving; the result is in `red[h·64]`.
#[cube]
fn reduce_heads(red: &mut SharedMemory<f32>, #[comptime] op: u32) {
    let u = UNIT_POS as usize;
    #[unroll]
    for step in 0..6u32 {
        let stride = comptime!(32usize >> step);
        if u < stride {
            #[unroll]
            for h in 0..HEADS {
                let a = red[h * PAGE + u];
                let b = red[h * PAGE + u + stride];
                if comptime!(op == 0) {
                    red[h * PAGE + u] = max(a, b);
                } else {
                    red[h * PAGE + u] = a + b;
                }
            }
        }
        sync_cube();
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mla_split_kernel(
    q: &Array<f32>,
    cache: &Array<f32>,
    pages: &Array<u32>,
    lens: &Array<u32>,
    partial: &mut Array<f32>,
    stats: &mut Array<f32>,
    heads: usize,
    width: usize,
    kv_lora: usize,
    max_pages: usize,
    splits: usize,
    #[comptime] cols: usize,
) {
    let groups = heads.div_ceil(HEADS);
    let seq = CUBE_POS_X as usize / groups;
    let h0 = (CUBE_POS_X as usize % groups) * HEADS;
    let split = CUBE_POS_Y as usize;
    let u = UNIT_POS as usize;
    let len = lens[seq] as usize;
    let n_pages = len.div_ceil(PAGE);
    let per_split = n_pages.div_ceil(splits);
    let p0 = split * per_split;
    let p1 = min(p0 + per_split, n_pages);

    // Stage the group's queries, each padded to a multiple of KCHUNK (zeros past the
    // row and past the last head).
    let stride = width.div_ceil(KCHUNK) * KCHUNK;
    let mut q_sh = SharedMemory::<f32>::new(comptime!(HEADS * MAX_WIDTH));
    let mut k_sh = SharedMemory::<f32>::new(comptime!(KCHUNK * PAGE));
    let mut red = SharedMemory::<f32>::new(comptime!(HEADS * PAGE));
    let mut p_sh = SharedMemory::<f32>::new(comptime!(HEADS * PAGE));
    for i in 0..(HEADS * stride).div_ceil(PAGE) {
        let idx = i * PAGE + u;
        if idx < HEADS * stride {
            let h = idx / stride;
            let c = idx % stride;
            let mut v = 0.0f32;
            if h0 + h < heads && c < width {
                v = q[((seq * heads) + h0 + h) * width + c];
            }
            q_sh[idx] = v;
        }
    }
    sync_cube();

    let mut m = Array::<f32>::new(HEADS);
    let mut l = Array::<f32>::new(HEADS);
    let mut s = Array::<f32>::new(HEADS);
    let mut acc = Array::<f32>::new(comptime!(HEADS * cols));
    #[unroll]
    for h in 0..HEADS {
        m[h] = NEG;
        l[h] = 0.0;
    }
    #[unroll]
    for i in 0..comptime!(HEADS * cols) {
        acc[i] = 0.0;
    }

    for p in p0..p1 {
        let block = pages[seq * max_pages + p] as usize;
        let valid = min(len - p * PAGE, PAGE);
        // Scores of this unit's token for every head of the group, KCHUNK columns at a
        // time: the page's rows are staged transposed (`k_sh[c][t]`, read from global
        // memory along the rows), so units read consecutive addresses.
        #[unroll]
        for h in 0..HEADS {
            s[h] = 0.0;
        }
        for c0 in 0..stride / KCHUNK {
            #[unroll]
            for i in 0..KCHUNK {
                let idx = i * PAGE + u;
                let t = idx / KCHUNK;
                let cc = idx % KCHUNK;
                let mut v = 0.0f32;
                if c0 * KCHUNK + cc < width {
                    v = cache[(block * PAGE + t) * width + c0 * KCHUNK + cc];
                }
                k_sh[cc * PAGE + t] = v;
            }
            sync_cube();
            for cc in 0..KCHUNK {
                let v = k_sh[cc * PAGE + u];
                let c = c0 * KCHUNK + cc;
                #[unroll]
                for h in 0..HEADS {
                    s[h] += q_sh[h * stride + c] * v;
                }
            }
            sync_cube();
        }
        if u >= valid {
            #[unroll]
            for h in 0..HEADS {
                s[h] = NEG;
            }
        }
        #[unroll]
        for h in 0..HEADS {
            red[h * PAGE + u] = s[h];
        }
        sync_cube();
        reduce_heads(&mut red, 0u32);
        // Each head's new running max; p = exp(s − max) (0 for masked tokens).
        #[unroll]
        for h in 0..HEADS {
            let m_new = max(m[h], red[h * PAGE]);
            let mut e = 0.0f32;
            if u < valid {
                e = (s[h] - m_new).exp();
            }
            p_sh[h * PAGE + u] = e;
            s[h] = m_new;
        }
        sync_cube();
        #[unroll]
        for h in 0..HEADS {
            red[h * PAGE + u] = p_sh[h * PAGE + u];
        }
        sync_cube();
        reduce_heads(&mut red, 1u32);
        #[unroll]
        for h in 0..HEADS {
            let alpha = (m[h] - s[h]).exp();
            l[h] = l[h] * alpha + red[h * PAGE];
            m[h] = s[h];
            #[unroll]
            for j in 0..cols {
                acc[h * cols + j] *= alpha;
            }
        }
        // Values: this unit's columns, every head, over the page's valid tokens.
        #[unroll]
        for j in 0..cols {
            let c = j * PAGE + u;
            if c < kv_lora {
                for t in 0..valid {
                    let v = cache[(block * PAGE + t) * width + c];
                    #[unroll]
                    for h in 0..HEADS {
                        acc[h * cols + j] += p_sh[h * PAGE + t] * v;
                    }
                }
            }
        }
        sync_cube();
    }

    #[unroll]
    for h in 0..HEADS {
        if h0 + h < heads {
            let base = ((seq * heads + h0 + h) * splits + split) * kv_lora;
            #[unroll]
            for j in 0..cols {
                let c = j * PAGE + u;
                if c < kv_lora {
                    partial[base + c] = acc[h * cols + j];
                }
            }
            if u == 0 {
                let sb = ((seq * heads + h0 + h) * splits + split) * 2;
                stats[sb] = m[h];
                stats[sb + 1] = l[h];
            }
        }
    }
}

#[cube(launch)]
fn mla_combine_kernel(partial: &Array<f32>, stats: &Array<f32>, out: &mut Array<f32>, rows: usize, kv_lora: usize, splits: usize) {
    let sh = CUBE_POS;
    if sh >= rows {
        terminate!();
    }
    let base = sh * splits;
    let mut top = stats[base * 2];
    for i in 1..splits {
        top = max(top, stats[(base + i) * 2]);
    }
    let mut total = 0.0f32;
    for i in 0..splits {
        total += stats[(base + i) * 2 + 1] * (stats[(base + i) * 2] - top).exp();
    }
    for c0 in 0..kv_lora.div_ceil(PAGE) {
        let c = c0 * PAGE + UNIT_POS as usize;
        if c < kv_lora {
            let mut v = 0.0f32;
            for i in 0..splits {
                v += partial[(base + i) * kv_lora + c] * (stats[(base + i) * 2] - top).exp();
            }
            out[sh * kv_lora + c] = v / total;
        }
    }
}

/// How many splits the pages of a sequence are cut into: enough cubes to fill the
/// device (`target` cubes), at least 2 pages per split, at most 16 splits.
pub fn splits_for(sequences: usize, heads: usize, max_pages: usize, target: usize) -> usize {
    let cubes = sequences * heads.div_ceil(HEADS);
    (target.div_ceil(cubes.max(1))).min(max_pages.div_ceil(2)).clamp(1, 16)
}

/// `out [n, H, kv_lora]` (contiguous f32) from `q [n, H, C]`, `cache [rows, C]`, `pages
/// [n, P]` (u32), `lens [n]` (u32, each ≥ 1 and ≤ `P · PAGE`). `C ≤ 576`, `kv_lora ≤ C`.
pub fn launch_mla_decode<R: CubeRuntime>(q: CubeTensor<R>, cache: CubeTensor<R>, pages: CubeTensor<R>, lens: CubeTensor<R>, out: CubeTensor<R>, kv_lora: usize) {
    let client = q.client.clone();
    let [n, heads, width] = [q.meta.shape()[0], q.meta.shape()[1], q.meta.shape()[2]];
    let max_pages = pages.meta.shape()[1];
    if n * heads * kv_lora == 0 {
        return;
    }
    assert!(width <= MAX_WIDTH, "MLA decode kernel: row width {width} is above {MAX_WIDTH}");
    let splits = splits_for(n, heads, max_pages, 64);
    let partial = super::empty(&client, &q.device, [n, heads, splits, kv_lora], burn::tensor::DType::F32);
    let stats = super::empty(&client, &q.device, [n, heads, splits, 2], burn::tensor::DType::F32);
    let cols = kv_lora.div_ceil(PAGE);
    mla_split_kernel::launch::<R>(
        &client,
        CubeCount::Static((n * heads.div_ceil(HEADS)) as u32, splits as u32, 1),
        CubeDim::new_1d(PAGE as u32),
        q.into_array_arg(),
        cache.into_array_arg(),
        pages.into_array_arg(),
        lens.into_array_arg(),
        partial.clone().into_array_arg(),
        stats.clone().into_array_arg(),
        heads,
        width,
        kv_lora,
        max_pages,
        splits,
        cols,
    );
    mla_combine_kernel::launch::<R>(
        &client,
        cubecl::calculate_cube_count_elemwise(&client, n * heads, CubeDim::new_1d(1)),
        CubeDim::new_1d(PAGE as u32),
        partial.into_array_arg(),
        stats.into_array_arg(),
        out.into_array_arg(),
        n * heads,
        kv_lora,
        splits,
    );
}

/// The MLA decode kernels at the configurations [`launch_mla_decode`] chooses: the column
/// count per unit follows `kv_lora` (DeepSeek-V3's 512, and the scaled-down models' 64 and
/// 32), and the combine kernel.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, _target: &CodegenTarget) -> Vec<KernelVariant> {
    let dim = CubeDim::new_1d(PAGE as u32);
    let mut out = Vec::new();
    for kv_lora in [512, 64, 32] {
        let cols = kv_lora.div_ceil(PAGE);
        let split = mla_split_kernel::MlaSplitKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), array(), array(), (), (), (), (), (), cols);
        out.push(KernelVariant::new("mla_split_kernel", format!("kv_lora {kv_lora}"), split));
    }
    let combine = mla_combine_kernel::MlaCombineKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), (), (), ());
    out.push(KernelVariant::new("mla_combine_kernel", (), combine));
    out
}
