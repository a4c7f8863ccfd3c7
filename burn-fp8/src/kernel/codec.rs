//! The FP8 codec inside kernels: the host codec of [`crate::Fp8Format`] restated with
//! integer operations, so it runs bit-identically on every runtime, including those without
//! FP8 types (wgpu, lavapipe). On runtimes with native FP8 conversions the decode can use
//! them instead ([`Fp8Decode::Native`]).

use crate::codegen::{array, settings, CodegenTarget, KernelVariant};
use crate::Fp8Format;
use cubecl::prelude::*;
use cubecl::{e4m3, e5m2};
use serde::{Deserialize, Serialize};

/// How a kernel turns FP8 codes into f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fp8Decode {
    /// The runtime's FP8 type and conversion instruction (CUDA sm_89+).
    Native,
    /// Integer bit manipulation of the code, valid everywhere.
    Software,
}

impl Fp8Decode {
    /// The fastest strategy the client supports for `format`.
    pub fn select<R: Runtime>(client: &ComputeClient<R>, format: Fp8Format) -> Self {
        use cubecl::ir::features::TypeUsage;
        let uses = match format {
            Fp8Format::E4M3 => e4m3::supported_uses(client),
            Fp8Format::E5M2 => e5m2::supported_uses(client),
        };
        if uses.contains(TypeUsage::Conversion) {
            Fp8Decode::Native
        } else {
            Fp8Decode::Software
        }
    }
}

/// f32 bits of a quiet NaN.
pub const NAN_BITS: u32 = 0x7FC0_0000;

/// Encodes `v` to an FP8 code (in the low 8 bits) with round-to-nearest-even and
/// saturation; NaN keeps its sign and becomes the canonical NaN code.
#[cube]
pub fn encode_fp8(v: f32, #[comptime] format: Fp8Format) -> u32 {
    let shift = comptime!(23 - format.mantissa_bits());
    let half_minus_one = comptime!((1u32 << (22 - format.mantissa_bits())) - 1);
    let rebias = comptime!(((127 - format.bias()) as u32) << format.mantissa_bits());
    // Smallest f32 biased exponent that is normal in the target format.
    let min_normal_exp = comptime!((128 - format.bias()) as u32);
    // Total right shift of the significand for a subnormal result is `sub_base - exp`.
    let sub_base = comptime!(23 - format.mantissa_bits() + 128 - format.bias() as u32);
    let max_code = comptime!(format.max_code() as u32);
    let nan_code = comptime!(format.nan_code() as u32);

    let bits = v.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    let exp = abs >> 23;

    // Normal result: round the dropped bits to nearest even; a carry bumps the exponent.
    let rounded = abs + half_minus_one + ((abs >> shift) & 1);
    let normal = (rounded >> shift) - rebias;

    // Subnormal result: the full significand shifted right by `total` (only used when
    // `exp < min_normal_exp`, where `total > shift`). Clamped so no shift is out of range.
    let total = select(exp < min_normal_exp, sub_base - exp, 1u32);
    let total_clamped = min(total, 31u32);
    let significand = (abs & 0x7F_FFFF) | 0x80_0000;
    let sub_rounded = significand + ((1u32 << (total_clamped - 1)) - 1) + ((significand >> total_clamped) & 1);
    let subnormal = select(exp == 0 || total > 24, 0u32, sub_rounded >> total_clamped);

    let magnitude = min(select(exp >= min_normal_exp, normal, subnormal), max_code);
    select(abs > 0x7F80_0000, sign | nan_code, sign | magnitude)
}

/// Decodes the FP8 code in the low 8 bits of `code` to f32, exactly.
#[cube]
pub fn decode_fp8(code: u32, #[comptime] format: Fp8Format, #[comptime] strategy: Fp8Decode) -> f32 {
    match strategy {
        Fp8Decode::Native => match format {
            Fp8Format::E4M3 => f32::cast_from(e4m3::from_bits(code as u8)),
            Fp8Format::E5M2 => f32::cast_from(e5m2::from_bits(code as u8)),
        },
        Fp8Decode::Software => decode_fp8_bits(code, format),
    }
}

/// Software decode: builds the f32 bits from the code's fields.
#[cube]
pub fn decode_fp8_bits(code: u32, #[comptime] format: Fp8Format) -> f32 {
    let m = comptime!(format.mantissa_bits());
    let frac_mask = comptime!((1u32 << format.mantissa_bits()) - 1);
    let exp_max = comptime!((1u32 << format.exponent_bits()) - 1);
    let rebias = comptime!((127 - format.bias()) as u32);
    let sub_step = comptime!(format.subnormal_step());

    let sign = (code & 0x80) << 24;
    let exponent = (code >> m) & exp_max;
    let fraction = code & frac_mask;

    let normal_bits = ((exponent + rebias) << 23) | (fraction << (23 - m));
    // Subnormal: fraction × 2^(1 - bias - m), a small integer times a normal power of two.
    let subnormal_bits = (f32::cast_from(fraction) * sub_step).to_bits();
    let special_bits = match format {
        // E4M3: only S.1111.111 is special (NaN); S.1111.xxx otherwise are normal numbers.
        Fp8Format::E4M3 => select(fraction == frac_mask, NAN_BITS, normal_bits),
        // E5M2: S.11111.00 is infinity, the rest NaN.
        Fp8Format::E5M2 => select(fraction == 0, 0x7F80_0000u32, NAN_BITS),
    };
    let magnitude = select(exponent == 0, subnormal_bits, select(exponent == exp_max, special_bits, normal_bits));
    f32::from_bits(sign | magnitude)
}

#[cube(launch)]
fn encode_kernel(input: &Array<f32>, codes: &mut Array<u32>, #[comptime] format: Fp8Format) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        codes[i] = encode_fp8(input[i], format);
    }
}

#[cube(launch)]
fn decode_kernel(codes: &Array<u32>, values: &mut Array<f32>, #[comptime] format: Fp8Format, #[comptime] strategy: Fp8Decode) {
    let i = ABSOLUTE_POS;
    if i < codes.len() {
        values[i] = decode_fp8(codes[i], format, strategy);
    }
}

/// Encodes `values` with the kernel codec on `client`'s device (used to check it against
/// the host codec and, on CUDA, against the native conversion).
pub fn encode_on_device<R: Runtime>(client: &ComputeClient<R>, values: &[f32], format: Fp8Format) -> Vec<u8> {
    if values.is_empty() {
        return Vec::new();
    }
    let input = client.create_from_slice(f32::as_bytes(values));
    let codes = client.create_from_slice(u32::as_bytes(&vec![0xDEAD_BEEFu32; values.len()]));
    let cube_dim = CubeDim::new(client, values.len());
    let cube_count = cubecl::calculate_cube_count_elemwise(client, values.len(), cube_dim);
    encode_kernel::launch::<R>(
        client,
        cube_count,
        cube_dim,
        unsafe { ArrayArg::from_raw_parts(input, values.len()) },
        unsafe { ArrayArg::from_raw_parts(codes.clone(), values.len()) },
        format,
    );
    let bytes = client.read_one_unchecked(codes);
    u32::from_bytes(&bytes)
        .iter()
        .map(|&c| {
            assert!(c <= 0xFF, "encode kernel left {c:#x}: output not written");
            c as u8
        })
        .collect()
}

/// Decodes `codes` on `client`'s device with `strategy`; `None` if the device cannot run
/// that strategy (native FP8 where the runtime has no FP8 type).
pub fn decode_on_device<R: Runtime>(client: &ComputeClient<R>, codes: &[u8], format: Fp8Format, strategy: Fp8Decode) -> Option<Vec<f32>> {
    if strategy == Fp8Decode::Native && Fp8Decode::select(client, format) != Fp8Decode::Native {
        return None;
    }
    if codes.is_empty() {
        return Some(Vec::new());
    }
    let words: Vec<u32> = codes.iter().map(|&c| c as u32).collect();
    let input = client.create_from_slice(u32::as_bytes(&words));
    // Poisoned output: a value no decode produces.
    let output = client.create_from_slice(f32::as_bytes(&vec![-1234.5f32; codes.len()]));
    let cube_dim = CubeDim::new(client, codes.len());
    let cube_count = cubecl::calculate_cube_count_elemwise(client, codes.len(), cube_dim);
    decode_kernel::launch::<R>(
        client,
        cube_count,
        cube_dim,
        unsafe { ArrayArg::from_raw_parts(input, codes.len()) },
        unsafe { ArrayArg::from_raw_parts(output.clone(), codes.len()) },
        format,
        strategy,
    );
    let bytes = client.read_one_unchecked(output);
    Some(f32::from_bytes(&bytes).to_vec())
}

/// The codec kernels at every configuration: both formats, each decode the target has.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let mut out = Vec::new();
    let settings = || settings(target.elementwise_cube_dim());
    for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
        out.push(KernelVariant::new("encode_kernel", format, encode_kernel::EncodeKernel::<R>::new(settings(), client.clone(), array(), array(), format)));
        for decode in target.decodes() {
            out.push(KernelVariant::new("decode_kernel", (format, decode), decode_kernel::DecodeKernel::<R>::new(settings(), client.clone(), array(), array(), format, decode)));
        }
    }
    out
}
