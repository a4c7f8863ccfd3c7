//! The kernel codec equals the host codec bit for bit.

use crate::common::KernelRuntime;
use crate::common::{kernel_device, Rng};
use burn_fp8::kernel::codec::{decode_on_device, encode_on_device};
use burn_fp8::kernel::Fp8Decode;
use burn_fp8::Fp8Format;
use cubecl::Runtime;

const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn software_decode_matches_host_on_all_codes() {
    let client = KernelRuntime::client(&kernel_device());
    let codes: Vec<u8> = (0..=255).collect();
    for format in FORMATS {
        let device = decode_on_device(&client, &codes, format, Fp8Decode::Software).unwrap();
        for (&code, &value) in codes.iter().zip(&device) {
            assert!(same_f32(value, format.decode(code)), "{format} code {code:#04x}: kernel {value}, host {}", format.decode(code));
        }
        // Native conversion, where the runtime has one (CUDA sm_89+), must agree too.
        if let Some(native) = decode_on_device(&client, &codes, format, Fp8Decode::Native) {
            for (&code, &value) in codes.iter().zip(&native) {
                assert!(same_f32(value, format.decode(code)), "{format} native code {code:#04x}: {value}");
            }
        }
    }
}

#[test]
fn encode_matches_host() {
    let client = KernelRuntime::client(&kernel_device());
    let mut rng = Rng::new("encode_matches_host");
    for format in FORMATS {
        let mut inputs = Vec::new();
        // Every representable value, both signs, and every midpoint with its neighbours.
        for code in 0..=format.max_code() {
            let v = format.decode(code);
            inputs.extend([v, -v]);
            let next = format.decode(code + 1);
            let mid = ((v as f64 + next as f64) / 2.0) as f32;
            inputs.extend([mid, -mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits() - 1)]);
        }
        // Overflow, specials, f32 subnormals.
        let max = format.max();
        inputs.extend([
            f32::from_bits(max.to_bits() + 1),
            max * 1.03,
            -max * 1.2,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            f32::from_bits(1),
            -f32::MIN_POSITIVE,
        ]);
        // Random bit patterns and random values in range.
        for _ in 0..20_000 {
            let bits = rng.next_u64() as u32;
            inputs.push(f32::from_bits(bits));
            inputs.push(f32::from_bits(bits & 0x807F_FFFF));
            inputs.push(rng.normal() * max / 4.0);
        }
        let device = encode_on_device(&client, &inputs, format);
        for (x, code) in inputs.iter().zip(device) {
            let host = format.encode(*x);
            if x.is_nan() {
                // The sign of a NaN is not meaningful; the code must be a NaN code.
                assert_eq!(code & 0x7F, format.nan_code(), "{format} NaN input gave {code:#04x}");
            } else {
                assert_eq!(code, host, "{format} x = {x:e} ({:#010x}): kernel {code:#04x}, host {host:#04x}", x.to_bits());
            }
        }
    }
}
