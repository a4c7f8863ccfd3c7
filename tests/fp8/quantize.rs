//! Quantization: kernel and reference equal the host quantizer bit for bit.

use crate::common::*;
use burn::tensor::{DType, Tensor};
use burn_fp8::host::HostFp8;
use burn_fp8::kernel::quantize::launch_quantize;
use burn_fp8::{Fp8Error, Fp8Format, Fp8Tensor, QuantConfig, ScaleMode, TileShape};

/// Shapes: single elements and rows, tails in both dimensions, DeepSeek-V3 activation and
/// weight shapes scaled down by 8 (hidden 7168 → 896, q_lora 1536 → 192).
const SHAPES: [[usize; 2]; 7] = [[1, 1], [1, 128], [3, 131], [129, 300], [128, 256], [64, 896], [192, 896]];

fn configs() -> Vec<QuantConfig> {
    let mut out = Vec::new();
    for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
        for tile in [TileShape::Row1x128, TileShape::Block128x128] {
            for mode in [ScaleMode::Exact, ScaleMode::PowerOfTwo] {
                out.push(QuantConfig { format, tile, scale_mode: mode });
            }
        }
    }
    out
}

fn assert_same(q_host: &HostFp8, got: &HostFp8, what: &str) {
    assert_eq!(got.shape, q_host.shape, "{what}: shape");
    let scale_bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(scale_bits(&got.scales), scale_bits(&q_host.scales), "{what}: scales");
    if let Some(i) = got.codes.iter().zip(&q_host.codes).position(|(a, b)| a != b) {
        let cols = got.shape[1];
        panic!("{what}: code at ({}, {}) is {:#04x}, host {:#04x}", i / cols, i % cols, got.codes[i], q_host.codes[i]);
    }
}

#[test]
fn kernel_and_reference_equal_host() {
    let mut rng = Rng::new("kernel_and_reference_equal_host");
    let device = kernel_device();
    for shape in SHAPES {
        let x = rng.matrix(shape[0], shape[1]);
        for config in configs() {
            let host = HostFp8::quantize(&x, shape, config);
            let what = format!("{shape:?} {config:?}");
            assert_same(&host, &HostFp8::from_tensor(&quantize::<Cube>(&x, shape, config, &device)), &format!("wgpu {what}"));
            assert_same(&host, &HostFp8::from_tensor(&quantize::<Ref>(&x, shape, config, &Default::default())), &format!("reference {what}"));
        }
    }
}

#[test]
fn transposed_quantization_reads_strides() {
    let mut rng = Rng::new("transposed_quantization_reads_strides");
    let shape = [300, 136];
    let x = rng.matrix(shape[0], shape[1]);
    let xt: Vec<f32> = (0..shape[1]).flat_map(|c| (0..shape[0]).map(move |r| (r, c))).map(|(r, c)| x[r * shape[1] + c]).collect();
    for config in [QuantConfig::activation(), QuantConfig::weight()] {
        let host = HostFp8::quantize(&xt, [shape[1], shape[0]], config);
        let q = Fp8Tensor::quantize_transposed(tensor::<Cube>(&x, shape, &kernel_device()), config);
        assert_same(&host, &HostFp8::from_tensor(&q), "wgpu transposed");
        let q = Fp8Tensor::quantize_transposed(tensor::<Ref>(&x, shape, &Default::default()), config);
        assert_same(&host, &HostFp8::from_tensor(&q), "reference transposed");
    }
}

#[test]
fn every_output_is_written() {
    let mut rng = Rng::new("every_output_is_written");
    let shape = [131, 200];
    let x = rng.matrix(shape[0], shape[1]);
    for config in [QuantConfig::activation(), QuantConfig::weight()] {
        let host = HostFp8::quantize(&x, shape, config);
        let device = kernel_device();
        let layout = burn_fp8::Fp8Layout { shape, config };
        // Poison: data words 0xFFFFFFFF (four NaN codes), scales NaN.
        let data = Tensor::<Cube, 2, burn::tensor::Int>::full(layout.data_shape(), -1, &device).cast(burn::tensor::IntDType::U32);
        let scales = poisoned::<Cube>(layout.scale_shape(), &device);
        let input = tensor::<Cube>(&x, shape, &device).into_primitive().tensor();
        let (data_p, scales_p) = (data.clone().into_primitive(), scales.clone().into_primitive().tensor());
        assert_eq!(data_p.dtype, DType::U32);
        launch_quantize(input, data_p, scales_p, config);
        assert_eq!(words(&data), host.words(), "{config:?}: data words");
        let got: Vec<u32> = to_vec(scales).iter().map(|s| s.to_bits()).collect();
        let want: Vec<u32> = host.scales.iter().map(|s| s.to_bits()).collect();
        assert_eq!(got, want, "{config:?}: scales");
    }
}

#[test]
fn zero_tiles_get_unit_scale() {
    let shape = [130, 260];
    let mut x = vec![0.0f32; shape[0] * shape[1]];
    x[5 * 260 + 200] = 3.0; // one non-zero tile
    for config in [QuantConfig::activation(), QuantConfig::weight()] {
        for q in [HostFp8::from_tensor(&quantize::<Cube>(&x, shape, config, &kernel_device())), HostFp8::from_tensor(&quantize::<Ref>(&x, shape, config, &Default::default()))] {
            let nonzero_tile = [5 / config.tile.rows(), 1];
            for (i, s) in q.scales.iter().enumerate() {
                let tile = [i / 3, i % 3];
                let want = if tile == nonzero_tile { 3.0 / 448.0 } else { 1.0 };
                assert_eq!(*s, want, "{config:?} tile {tile:?}");
            }
            assert_eq!(q.codes.iter().filter(|&&c| c != 0).count(), 1);
        }
    }
}

#[test]
fn non_finite_inputs_are_reported() {
    let shape = [140, 300];
    let mut x = vec![1.0f32; shape[0] * shape[1]];
    x[2 * 300 + 10] = f32::NAN; // tile row 2 (1×128) / 0 (128×128), tile col 0
    x[139 * 300 + 299] = f32::INFINITY; // last row, tile col 2
    for config in [QuantConfig::activation(), QuantConfig::weight()] {
        let r = config.tile.rows();
        let expected = vec![[2 / r, 0], [139 / r, 2]];
        match Fp8Tensor::<Cube>::try_quantize(tensor(&x, shape, &kernel_device()), config) {
            Err(Fp8Error::NonFinite { tiles, count, .. }) => assert_eq!((tiles, count), (expected.clone(), 2), "wgpu {config:?}"),
            Err(other) => panic!("wgpu {config:?}: expected NonFinite, got {other}"),
            Ok(_) => panic!("wgpu {config:?}: non-finite input was accepted"),
        }
        let q = quantize::<Cube>(&x, shape, config, &kernel_device());
        let err = q.check_finite().unwrap_err();
        assert!(err.to_string().contains("NaN or infinity"), "{err}");
        // The NaN tile dequantizes to NaN, never to a number; other tiles stay exact.
        let d = to_vec(q.dequantize());
        assert!(d[2 * 300 + 10].is_nan() && d[2 * 300 + 11].is_nan());
        assert_eq!(d[100 * 300 + 150], 1.0);
        let q = quantize::<Ref>(&x, shape, config, &Default::default());
        match q.check_finite() {
            Err(Fp8Error::NonFinite { tiles, .. }) => assert_eq!(tiles, expected, "reference {config:?}"),
            other => panic!("reference {config:?}: {other:?}"),
        }
    }
}

#[test]
fn dequantize_matches_host_and_reference() {
    let mut rng = Rng::new("dequantize_matches_host_and_reference");
    for shape in [[1, 5], [129, 300], [64, 896]] {
        let x = rng.matrix(shape[0], shape[1]);
        for config in [QuantConfig::activation(), QuantConfig::weight().with_format(Fp8Format::E5M2)] {
            let q = quantize::<Cube>(&x, shape, config, &kernel_device());
            let host = HostFp8::from_tensor(&q).dequantize_f64();
            let got = to_vec(q.dequantize());
            // decode × scale is one f32 product: at most half an ulp from the exact value.
            for (i, (g, h)) in got.iter().zip(&host).enumerate() {
                assert!((*g as f64 - h).abs() <= h.abs() * 2f64.powi(-24), "{shape:?} {config:?} [{i}]: {g} vs {h}");
            }
            let r = to_vec(quantize::<Ref>(&x, shape, config, &Default::default()).dequantize());
            assert_eq!(got, r, "{shape:?} {config:?}: kernel vs reference dequantize");
            // And the round trip is within E4M3/E5M2's relative precision of the input
            // (2^-4 / 2^-3 of the value, or of the tile's subnormal step).
            let rel = if config.format == Fp8Format::E4M3 { 1.0 / 16.0 } else { 1.0 / 8.0 };
            let host_q = HostFp8::from_tensor(&q);
            for (i, (g, x)) in got.iter().zip(&x).enumerate() {
                let step = config.format.subnormal_step() * host_q.scale(i / shape[1], i % shape[1]);
                assert!((g - x).abs() <= x.abs() * rel + step, "{shape:?} {config:?} [{i}]: {g} vs {x}");
            }
        }
    }
}
