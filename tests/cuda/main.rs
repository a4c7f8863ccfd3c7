//! Every kernel of the workspace, at every configuration its launcher can choose, compiled
//! for NVIDIA GPUs on this machine: CubeCL's CUDA compiler writes the C++, NVRTC compiles
//! it for sm_80 (A100), sm_89 (L40, Ada) and sm_90a (H100), and `ptxas` reports each
//! kernel's registers, spills and shared memory. No GPU or driver is needed; NVRTC and the
//! CUDA headers come from NVIDIA's PyPI wheels, unpacked by `tests/run.sh`
//! (`burn_fp8::codegen::cuda` says where it looks).
//!
//! The table of resources is written to `$CARGO_TARGET_TMPDIR/cuda-kernels.md` (printed
//! with `--nocapture`); docs/benchmarks.md keeps a summary.

use burn_fp8::codegen::cuda::{self, CudaKernel};
use burn_fp8::codegen::{CodegenTarget, KernelVariant};
use cubecl::wgpu::WgpuRuntime;
use cubecl::Runtime;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The architectures the kernels target.
const ARCHS: [u32; 3] = [80, 89, 90];

/// Shared memory a block may use without opting in (`cudaFuncSetAttribute`), on every
/// architecture above: the launchers do not opt in.
const DEFAULT_SHARED_LIMIT: usize = 48 * 1024;

/// Spill stores a GPU-path kernel may have (see the check).
const MAX_SPILL_BYTES: u32 = 64;

fn all_variants(target: &CodegenTarget) -> Vec<KernelVariant> {
    // The expansion is the same on any runtime's client (the kernels read no device
    // property); the launch configurations come from `target`.
    let client = WgpuRuntime::client(&Default::default());
    let mut all = burn_fp8::codegen::variants(&client, target);
    all.extend(burn_moe::kernel::variants(&client, target));
    all
}

/// Compiles every variant for `target`: CUDA C++ here (CubeCL's IR is not `Send`), NVRTC on
/// as many threads as the machine has (it compiles separate programs concurrently). The
/// compiled kernels (by thread, then variant) and the failures' messages.
fn compile_all(target: &CodegenTarget) -> (Vec<CudaKernel>, Vec<String>) {
    assert!(cuda::nvrtc_available(), "{}", cuda::CudaCodegenError::NvrtcMissing);
    let mut failed = Vec::new();
    let mut sources = Vec::new();
    for variant in all_variants(target) {
        match cuda::cuda_source(&variant, target) {
            Ok((source, shared_bytes)) => sources.push((variant.name, source, shared_bytes)),
            Err(err) => failed.push(err.to_string()),
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<Result<CudaKernel, cuda::CudaCodegenError>> = std::thread::scope(|scope| {
        // Thread `t` takes every `threads`-th variant, so that the slow GEMMs are spread.
        let sources = &sources;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    sources
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|(name, source, shared_bytes)| cuda::compile_kernel(name, source.clone(), *shared_bytes, target))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a compile thread panicked")).collect()
    });
    let mut compiled = Vec::new();
    for result in results {
        match result {
            Ok(kernel) => compiled.push(kernel),
            Err(err) => failed.push(err.to_string()),
        }
    }
    (compiled, failed)
}

/// The kernel's function name, without its configuration.
fn function(name: &str) -> &str {
    name.split('[').next().unwrap_or(name)
}

#[test]
fn every_kernel_compiles_for_sm80_sm89_sm90() {
    let mut table = String::from("| kernel | arch | variants | registers (max) | spill bytes (max, stores + loads) | shared memory (max) |\n|---|---|---|---|---|---|\n");
    let mut detail = String::from("| variant | arch | registers | spill stores | spill loads | stack | shared bytes |\n|---|---|---|---|---|---|---|\n");
    let mut failures = Vec::new();
    for sm in ARCHS {
        let target = CodegenTarget::cuda(sm);
        let (mut compiled, failed) = compile_all(&target);
        compiled.sort_by(|a, b| a.name.cmp(&b.name));
        failures.extend(failed);
        assert!(!compiled.is_empty(), "sm_{sm}: nothing compiled");
        let mut per_function: BTreeMap<&str, (usize, u32, u32, usize)> = BTreeMap::new();
        for k in &compiled {
            let r = k.resources;
            assert!(r.registers > 0, "{} sm_{sm}: ptxas reported no register count", k.name);
            assert!(
                k.shared_bytes + r.static_shared_bytes as usize <= DEFAULT_SHARED_LIMIT,
                "{} sm_{sm}: {} bytes of shared memory, above the {DEFAULT_SHARED_LIMIT} a launch gets without opting in",
                k.name,
                k.shared_bytes
            );
            // What the launchers choose on a GPU must not spill for lack of registers. ptxas
            // does spill a few words with registers to spare (48 bytes at 128 registers in
            // the grouped 4×8 GEMM on sm_80): up to 64 bytes pass; register pressure (16×8
            // tiles: 444-480 bytes at 255 registers) fails. The direct-staging kernels are
            // the CPU adapters' path (a GPU runs them only when asked to).
            if !function(&k.name).starts_with("direct_") {
                assert!(r.spill_stores <= MAX_SPILL_BYTES, "{} sm_{sm} spills: {r:?}", k.name);
            }
            let entry = per_function.entry(function(&k.name)).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(r.registers);
            entry.2 = entry.2.max(r.spill_stores + r.spill_loads);
            entry.3 = entry.3.max(k.shared_bytes + r.static_shared_bytes as usize);
            writeln!(detail, "| `{}` | sm_{sm} | {} | {} | {} | {} | {} |", k.name, r.registers, r.spill_stores, r.spill_loads, r.stack_bytes, k.shared_bytes).unwrap();
        }
        for (name, (count, registers, spills, shared)) in per_function {
            writeln!(table, "| `{name}` | sm_{sm} | {count} | {registers} | {spills} | {shared} |").unwrap();
        }
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-kernels.md");
    std::fs::write(&path, format!("{table}\n{detail}")).unwrap();
    println!("{table}\n(every variant: {})", path.display());
    assert!(failures.is_empty(), "{} kernel variants failed to compile:\n{}", failures.len(), failures.join("\n\n"));
}

/// Where the target converts FP8 in hardware, the native decode's PTX uses the conversion
/// instruction (`cvt.rn.f16x2.e4m3x2` / `.e5m2x2`) and the software decode's does not: the
/// two strategies are different code, and the native one is what sm_89+ runs.
#[test]
fn native_fp8_decode_uses_the_hardware_conversion() {
    let client = WgpuRuntime::client(&Default::default());
    let ada = CodegenTarget::cuda(89);
    let decodes: Vec<KernelVariant> = burn_fp8::kernel::codec::variants(&client, &ada).into_iter().filter(|v| v.name.starts_with("decode_kernel")).collect();
    assert_eq!(decodes.len(), 4, "E4M3 and E5M2, software and native");
    for variant in decodes {
        let ptx = cuda::compile(&variant, &ada).unwrap_or_else(|e| panic!("{e}")).ptx;
        let converts = ptx.contains("cvt.rn.f16x2.e4m3x2") || ptx.contains("cvt.rn.f16x2.e5m2x2");
        assert_eq!(converts, variant.name.contains("Native"), "{}: hardware FP8 conversion in PTX = {converts}", variant.name);
    }
    // Before sm_89 there is no native variant to choose.
    assert!(burn_fp8::kernel::codec::variants(&client, &CodegenTarget::cuda(80)).iter().all(|v| !v.name.contains("Native")));
}

/// A kernel NVRTC rejects is reported with its name, the architecture and NVRTC's log: the
/// check fails loudly rather than passing over a variant.
#[test]
fn a_rejected_source_names_the_kernel_and_architecture() {
    let client = WgpuRuntime::client(&Default::default());
    let target = CodegenTarget::cuda(80);
    let variant = burn_moe::kernel::plan::variants(&client, &target).remove(0);
    let (source, _) = cuda::cuda_source(&variant, &target).unwrap();
    let broken = format!("{source}\nthis is not C++;\n");
    let err = cuda::compile_source(&variant.name, &broken, &target).unwrap_err().to_string();
    assert!(err.contains("plan_kernel") && err.contains("sm_80") && err.contains("error"), "{err}");
}
