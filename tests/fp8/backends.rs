//! The same ops through Burn's fused wgpu backend and through Autodiff.

use crate::common::*;
use burn::backend::Autodiff;
use burn_fp8::host::HostFp8;
use burn_fp8::{fp8_gemm, Fp8Tensor, QuantConfig};

#[test]
fn fused_backend_equals_kernels() {
    let mut rng = Rng::new("fused_backend_equals_kernels");
    let (m, n, k) = (70, 130, 300);
    let (a, b) = (rng.matrix(m, k), rng.matrix(n, k));
    let device = kernel_device();
    let run = |a_q: HostFp8, b_q: HostFp8, d: Vec<f32>| (a_q, b_q, d);
    let cube = {
        let qa = quantize::<Cube>(&a, [m, k], QuantConfig::activation(), &device);
        let qb = quantize::<Cube>(&b, [n, k], QuantConfig::weight(), &device);
        run(HostFp8::from_tensor(&qa), HostFp8::from_tensor(&qb), to_vec(fp8_gemm(&qa, &qb)))
    };
    let fused = {
        // Feed the fused backend a lazy expression so the custom op sits inside a stream.
        let x = tensor::<Fused>(&a, [m, k], &device) * 1.0;
        let qa = Fp8Tensor::quantize(x, QuantConfig::activation());
        let qb = quantize::<Fused>(&b, [n, k], QuantConfig::weight(), &device);
        let d = fp8_gemm(&qa, &qb) + 0.0;
        let deq = qa.dequantize();
        assert_eq!(deq.dims(), [m, k]);
        run(HostFp8::from_tensor(&qa), HostFp8::from_tensor(&qb), to_vec(d))
    };
    assert_eq!(cube.0, fused.0);
    assert_eq!(cube.1, fused.1);
    assert_eq!(cube.2, fused.2);
}

#[test]
fn autodiff_backends_forward_to_inner() {
    let mut rng = Rng::new("autodiff_backends_forward_to_inner");
    let (m, n, k) = (9, 20, 200);
    let (a, b) = (rng.matrix(m, k), rng.matrix(n, k));
    let plain = {
        let qa = quantize::<Cube>(&a, [m, k], QuantConfig::activation(), &kernel_device());
        let qb = quantize::<Cube>(&b, [n, k], QuantConfig::weight(), &kernel_device());
        to_vec(fp8_gemm(&qa, &qb))
    };
    let ad = {
        let qa = quantize::<Autodiff<Cube>>(&a, [m, k], QuantConfig::activation(), &kernel_device());
        let qb = quantize::<Autodiff<Cube>>(&b, [n, k], QuantConfig::weight(), &kernel_device());
        to_vec(fp8_gemm(&qa, &qb))
    };
    assert_eq!(plain, ad);
    let ad_ref = {
        let qa = quantize::<Autodiff<Ref>>(&a, [m, k], QuantConfig::activation(), &Default::default());
        let qb = quantize::<Autodiff<Ref>>(&b, [n, k], QuantConfig::weight(), &Default::default());
        to_vec(fp8_gemm(&qa, &qb))
    };
    let max = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (x, y) in plain.iter().zip(&ad_ref) {
        assert!((x - y).abs() <= 1e-5 * max, "{x} vs {y}");
    }
}

#[test]
fn from_parts_checks_shapes() {
    let device = kernel_device();
    let q = quantize::<Cube>(&vec![0.5; 3 * 200], [3, 200], QuantConfig::weight(), &device);
    let ok = Fp8Tensor::from_parts(q.data().clone(), q.scales().clone(), [3, 200], QuantConfig::weight());
    assert!(ok.is_ok());
    let err = Fp8Tensor::from_parts(q.data().clone(), q.scales().clone(), [3, 300], QuantConfig::weight()).unwrap_err();
    assert_eq!(err.to_string(), "FP8 data has shape [3, 64], the layout requires [3, 96]");
}
