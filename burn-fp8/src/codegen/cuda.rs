//! CUDA C++ and PTX for the kernel variants, on a machine without a GPU or a CUDA toolkit:
//! CubeCL's CUDA compiler writes the C++ (as the CUDA runtime does before a launch), NVRTC
//! compiles it for a real architecture and its embedded `ptxas` reports each kernel's
//! resources (registers, spills, shared memory).
//!
//! NVRTC is loaded at run time (cudarc's dynamic loading): `libnvrtc.so.12` must be on the
//! loader's path. `tests/run.sh` unpacks it from NVIDIA's `nvidia-cuda-nvrtc-cu12` wheel
//! and sets `LD_LIBRARY_PATH`; on a machine with CUDA installed it is already there. The
//! CUDA headers the sources include (`cuda_runtime.h`, `cuda_fp8.h`, ...) are searched in
//! `$NVRTC_INCLUDE_PATH` (`tests/run.sh` unpacks them from the `nvidia-cuda-runtime-cu12`
//! wheel) and `/usr/local/cuda/include`. (Not `CUDA_PATH`: cudarc's build script reads that
//! one, and setting it rebuilds every CUDA crate.)

use super::{CodegenTarget, KernelVariant};
use cubecl::cuda::CudaCompiler;
use cubecl::{Compiler, ExecutionMode};
use cubecl_cpp::shared::{CompilationOptions, CppSupportedFeatures};
use std::ffi::{CStr, CString};

/// A kernel variant compiled for one architecture.
#[derive(Debug, Clone)]
pub struct CudaKernel {
    /// The variant's name ([`KernelVariant::name`]).
    pub name: String,
    /// Compute capability it was compiled for.
    pub sm: u32,
    /// CUDA C++ as CubeCL's compiler wrote it.
    pub source: String,
    /// PTX as NVRTC produced it.
    pub ptx: String,
    /// Shared memory the kernel declares, in bytes (launched as dynamic shared memory).
    pub shared_bytes: usize,
    /// What `ptxas` reported.
    pub resources: PtxasResources,
}

/// Per-kernel resource usage reported by `ptxas -v`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtxasResources {
    /// Registers per thread.
    pub registers: u32,
    /// Statically allocated shared memory, in bytes (CubeCL's is dynamic: see
    /// [`CudaKernel::shared_bytes`]).
    pub static_shared_bytes: u32,
    /// Stack frame per thread, in bytes.
    pub stack_bytes: u32,
    /// Bytes spilled to local memory by stores.
    pub spill_stores: u32,
    /// Bytes reloaded from local memory.
    pub spill_loads: u32,
}

/// Why a variant did not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaCodegenError {
    /// NVRTC's library could not be loaded.
    NvrtcMissing,
    /// CubeCL's CUDA compiler rejected the kernel.
    Cpp {
        /// The variant.
        kernel: String,
        /// CubeCL's message.
        reason: String,
    },
    /// NVRTC rejected the CUDA C++.
    Nvrtc {
        /// The variant.
        kernel: String,
        /// The architecture.
        sm: u32,
        /// NVRTC's log.
        log: String,
    },
}

impl core::fmt::Display for CudaCodegenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NvrtcMissing => write!(
                f,
                "NVRTC (libnvrtc.so.12) is not on the loader's path: install CUDA, or unpack NVIDIA's nvidia-cuda-nvrtc-cu12 wheel and add its nvidia/cuda_nvrtc/lib to LD_LIBRARY_PATH (tests/run.sh does)"
            ),
            Self::Cpp { kernel, reason } => write!(f, "{kernel}: CubeCL's CUDA compiler failed: {reason}"),
            Self::Nvrtc { kernel, sm, log } => write!(f, "{kernel}: NVRTC failed for sm_{sm}:\n{log}"),
        }
    }
}

impl std::error::Error for CudaCodegenError {}

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: tries to open the library by name; nothing is called from it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The compiler options CubeCL's CUDA runtime uses on a device of `target`'s architecture
/// (`cubecl-cuda`'s runtime registers the same features when it opens a device).
pub fn compilation_options(target: &CodegenTarget) -> CompilationOptions {
    CompilationOptions {
        warp_size: target.plane_size,
        supports_features: CppSupportedFeatures {
            fast_math: true,
            grid_constants: target.sm >= 70,
            fast_tanh: target.sm >= 75,
            clusters: target.sm >= 90,
            elect_sync: target.sm >= 90,
        },
    }
}

/// The CUDA C++ of `variant` and the shared memory it declares.
pub fn cuda_source(variant: &KernelVariant, target: &CodegenTarget) -> Result<(String, usize), CudaCodegenError> {
    let mut compiler = CudaCompiler::default();
    let repr = compiler
        .compile(variant.definition.clone(), &compilation_options(target), ExecutionMode::Checked, variant.address_type)
        .map_err(|err| CudaCodegenError::Cpp { kernel: variant.name.clone(), reason: format!("{err:?}") })?;
    Ok((repr.to_string(), repr.shared_memory_size()))
}

/// NVRTC's architecture flag as CubeCL's CUDA runtime passes it (`sm_90a` on Hopper, for
/// its architecture-specific instructions).
pub fn arch_flag(sm: u32) -> String {
    if sm >= 90 {
        format!("--gpu-architecture=sm_{sm}a")
    } else {
        format!("--gpu-architecture=sm_{sm}")
    }
}

/// Where NVRTC looks for the CUDA headers: `$NVRTC_INCLUDE_PATH` (colon-separated), then
/// `/usr/local/cuda/include` where it exists.
pub fn include_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = std::env::var("NVRTC_INCLUDE_PATH").map(|v| v.split(':').filter(|d| !d.is_empty()).map(String::from).collect()).unwrap_or_default();
    if std::path::Path::new("/usr/local/cuda/include").exists() {
        dirs.push("/usr/local/cuda/include".into());
    }
    dirs
}

/// Compiles `variant` for `target` with NVRTC: CUDA C++, PTX and `ptxas`'s resource report.
pub fn compile(variant: &KernelVariant, target: &CodegenTarget) -> Result<CudaKernel, CudaCodegenError> {
    let (source, shared_bytes) = cuda_source(variant, target)?;
    compile_kernel(&variant.name, source, shared_bytes, target)
}

/// The second half of [`compile`]: NVRTC on the C++ [`cuda_source`] wrote for the variant
/// `name` (which, unlike the variant, can be sent to another thread).
pub fn compile_kernel(name: &str, source: String, shared_bytes: usize, target: &CodegenTarget) -> Result<CudaKernel, CudaCodegenError> {
    let Nvrtc { ptx, log } = compile_source(name, &source, target)?;
    Ok(CudaKernel { name: name.to_string(), sm: target.sm, source, ptx, shared_bytes, resources: parse_ptxas(&log) })
}

/// What NVRTC made of a source.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    /// The PTX.
    pub ptx: String,
    /// NVRTC's log, with `ptxas`'s report.
    pub log: String,
}

/// Compiles CUDA C++ `source` (the kernel `kernel`) for `target` with the options CubeCL's
/// CUDA runtime uses, plus `ptxas`'s verbose report.
pub fn compile_source(kernel: &str, source: &str, target: &CodegenTarget) -> Result<Nvrtc, CudaCodegenError> {
    if !nvrtc_available() {
        return Err(CudaCodegenError::NvrtcMissing);
    }
    let nvrtc_err = |log: String| CudaCodegenError::Nvrtc { kernel: kernel.to_string(), sm: target.sm, log };
    let mut options = vec![arch_flag(target.sm), "--ptxas-options=--verbose".to_string(), "-lineinfo".to_string()];
    for dir in include_dirs() {
        options.push(format!("--include-path={dir}"));
    }
    let c_source = CString::new(source).map_err(|err| nvrtc_err(format!("source holds a NUL byte: {err}")))?;
    // SAFETY: NVRTC's FFI as CubeCL's CUDA runtime calls it: the program is created from a
    // NUL-terminated source that outlives it, read, and destroyed once.
    let (compiled, log, ptx) = unsafe {
        let program = cudarc::nvrtc::result::create_program(c_source.as_c_str(), None).map_err(|err| nvrtc_err(format!("{err:?}")))?;
        let compiled = cudarc::nvrtc::result::compile_program(program, &options);
        let log = cudarc::nvrtc::result::get_program_log(program).map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
        let ptx = match compiled {
            Ok(()) => cudarc::nvrtc::result::get_ptx(program).map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned()).ok(),
            Err(_) => None,
        };
        let _ = cudarc::nvrtc::result::destroy_program(program);
        (compiled, log, ptx)
    };
    match (compiled, ptx) {
        (Ok(()), Some(ptx)) => Ok(Nvrtc { ptx, log }),
        _ => Err(nvrtc_err(format!("{log}\n--- source ---\n{source}"))),
    }
}

/// Reads `ptxas -v`'s report: `Used 40 registers, ... 16 bytes smem` and
/// `24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads`.
pub fn parse_ptxas(log: &str) -> PtxasResources {
    let mut out = PtxasResources::default();
    for line in log.lines() {
        let words: Vec<&str> = line.split([' ', ',', ':']).filter(|w| !w.is_empty()).collect();
        for (i, pair) in words.windows(2).enumerate() {
            let Ok(value) = pair[0].parse::<u32>() else { continue };
            let next = words.get(i + 2).copied().unwrap_or("");
            match (pair[1], next) {
                ("registers", _) => out.registers = value,
                ("bytes", "smem") => out.static_shared_bytes = value,
                ("bytes", "stack") => out.stack_bytes = value,
                ("bytes", "spill") => match words.get(i + 3).copied() {
                    Some("stores") => out.spill_stores = value,
                    Some("loads") => out.spill_loads = value,
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ptxas_reports() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas info    : Function properties for k\n    \
                   24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n";
        let r = parse_ptxas(log);
        assert_eq!(r, PtxasResources { registers: 168, static_shared_bytes: 16, stack_bytes: 24, spill_stores: 8, spill_loads: 12 });
    }

    #[test]
    fn options_follow_the_architecture() {
        assert!(!compilation_options(&CodegenTarget::cuda(80)).supports_features.clusters);
        assert!(compilation_options(&CodegenTarget::cuda(90)).supports_features.clusters);
        assert_eq!(arch_flag(89), "--gpu-architecture=sm_89");
        assert_eq!(arch_flag(90), "--gpu-architecture=sm_90a");
    }
}
