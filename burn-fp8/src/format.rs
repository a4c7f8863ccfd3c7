//! FP8 element formats and the host codec.
//!
//! Two formats from the OCP 8-bit floating point specification:
//!
//! | format | bits (s.e.m) | bias | max normal | min subnormal | specials |
//! |---|---|---|---|---|---|
//! | E4M3 | 1.4.3 | 7 | 448 | 2⁻⁹ | NaN = S.1111.111, no infinities |
//! | E5M2 | 1.5.2 | 15 | 57344 | 2⁻¹⁶ | ±inf = S.11111.00, NaN = S.11111.{01,10,11} |
//!
//! # Rounding and saturation
//! [`Fp8Format::encode`] rounds to nearest, ties to even, and saturates: any finite value
//! or infinity whose magnitude rounds above the largest finite code becomes ±max (CUDA's
//! `__NV_SATFINITE` behaviour). Subnormal f32 inputs are far below the smallest FP8
//! subnormal and encode to ±0.
//!
//! # NaN policy
//! NaN encodes to the canonical NaN code `0x7F` with the input's sign bit (`0xFF` for a
//! negative NaN); every NaN code decodes to an f32 NaN. The codec never turns a NaN into a
//! number. Infinity saturates to ±max at the codec level, so the *quantization* layer
//! ([`crate::Fp8Tensor::quantize`]) detects non-finite tiles before encoding and marks them with a NaN
//! scale, which [`crate::Fp8Tensor::check_finite`] reports.
//!
//! The kernels carry a bit-for-bit copy of this codec written with integer operations
//! (`kernel/codec.rs`); the tests check the two agree on all 256 codes and on random inputs.
//!
//! # Example
//! ```
//! use burn_fp8::Fp8Format;
//!
//! let e4m3 = Fp8Format::E4M3;
//! let round_trip = |x: f32| e4m3.decode(e4m3.encode(x));
//! assert_eq!(round_trip(1.0), 1.0);
//! assert_eq!(round_trip(0.3), 0.3125); // 3 mantissa bits: 1.2 · 2⁻² rounds to 1.25 · 2⁻²
//! assert_eq!(round_trip(1000.0), 448.0); // saturates
//! assert!(round_trip(f32::NAN).is_nan());
//! assert_eq!(Fp8Format::E5M2.decode(Fp8Format::E5M2.encode(1000.0)), 1024.0);
//! ```

use serde::{Deserialize, Serialize};

/// An 8-bit floating point element format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, max 448. DeepSeek-V3 uses it for all three GEMMs.
    #[default]
    E4M3,
    /// 5 exponent bits, 2 mantissa bits, max 57344; wider range, less precision.
    E5M2,
}

impl Fp8Format {
    /// Number of mantissa bits.
    pub const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// Number of exponent bits.
    pub const fn exponent_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 4,
            Fp8Format::E5M2 => 5,
        }
    }

    /// Exponent bias.
    pub const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// Largest finite magnitude.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Code of the largest finite magnitude (sign bit clear).
    pub const fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// Canonical NaN code (sign bit clear).
    pub const fn nan_code(self) -> u8 {
        0x7F
    }

    /// Spacing of the subnormal grid, `2^(1 - bias - mantissa_bits)`.
    pub fn subnormal_step(self) -> f32 {
        (2.0f32).powi(1 - self.bias() - self.mantissa_bits() as i32)
    }

    /// The matching Burn / CubeCL quantization value type.
    pub const fn quant_value(self) -> burn::tensor::quantization::QuantValue {
        match self {
            Fp8Format::E4M3 => burn::tensor::quantization::QuantValue::E4M3,
            Fp8Format::E5M2 => burn::tensor::quantization::QuantValue::E5M2,
        }
    }

    /// Encodes an f32 with round-to-nearest-even and saturation to ±max.
    pub fn encode(self, x: f32) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        if x.is_nan() {
            return sign | self.nan_code();
        }
        let abs = bits & 0x7FFF_FFFF;
        let m = self.mantissa_bits();
        let bias = self.bias();
        let shift = 23 - m;
        let exp = (abs >> 23) as i32;
        // Biased exponent of the value in the target format.
        let e = exp - 127 + bias;
        let magnitude = if e >= 1 {
            // Normal: round the dropped `shift` bits to nearest even; a carry out of the
            // mantissa correctly bumps the exponent.
            let rounded = abs + ((1 << (shift - 1)) - 1) + ((abs >> shift) & 1);
            (rounded >> shift) - (((127 - bias) as u32) << m)
        } else {
            // Subnormal: shift the full significand further right by (1 - e).
            let total = shift + (1 - e) as u32;
            if exp == 0 || total > 24 {
                0
            } else {
                let significand = (abs & 0x7F_FFFF) | 0x80_0000;
                let rounded = significand + ((1 << (total - 1)) - 1) + ((significand >> total) & 1);
                rounded >> total
            }
        };
        sign | magnitude.min(self.max_code() as u32) as u8
    }

    /// Decodes an FP8 code to f32 (exact: every FP8 value is an f32 value).
    pub fn decode(self, code: u8) -> f32 {
        let m = self.mantissa_bits();
        let exponent = ((code & 0x7F) >> m) as i32;
        let fraction = (code & ((1 << m) - 1)) as u32;
        let emax = (1 << self.exponent_bits()) - 1;
        let magnitude = match self {
            Fp8Format::E4M3 if exponent == emax && fraction == (1 << m) - 1 => f32::NAN,
            Fp8Format::E5M2 if exponent == emax && fraction == 0 => f32::INFINITY,
            Fp8Format::E5M2 if exponent == emax => f32::NAN,
            _ if exponent == 0 => fraction as f32 * self.subnormal_step(),
            _ => f32::from_bits((((exponent - self.bias() + 127) as u32) << 23) | (fraction << (23 - m))),
        };
        if code & 0x80 != 0 {
            -magnitude
        } else {
            magnitude
        }
    }

    /// The decoded value of every code, indexed by code.
    pub fn decode_table(self) -> [f32; 256] {
        core::array::from_fn(|code| self.decode(code as u8))
    }
}

impl core::fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Fp8Format::E4M3 => f.write_str("e4m3"),
            Fp8Format::E5M2 => f.write_str("e5m2"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

    #[test]
    fn every_code_round_trips() {
        for format in FORMATS {
            for code in 0..=255u8 {
                let value = format.decode(code);
                if value.is_nan() {
                    // All NaN codes collapse to the canonical NaN with the same sign.
                    assert_eq!(format.encode(value), (code & 0x80) | format.nan_code());
                } else if value.is_infinite() {
                    // E5M2 infinities saturate to ±max.
                    assert_eq!(format.encode(value), (code & 0x80) | format.max_code());
                } else {
                    assert_eq!(format.encode(value), code, "{format} code {code:#04x} = {value}");
                }
            }
        }
    }

    #[test]
    fn known_values() {
        // Values from the OCP FP8 specification's tables.
        assert_eq!(Fp8Format::E4M3.decode(0x7E), 448.0);
        assert_eq!(Fp8Format::E4M3.decode(0x01), 2f32.powi(-9));
        assert_eq!(Fp8Format::E4M3.decode(0x08), 2f32.powi(-6));
        assert_eq!(Fp8Format::E5M2.decode(0x7B), 57344.0);
        assert_eq!(Fp8Format::E5M2.decode(0x01), 2f32.powi(-16));
        assert_eq!(Fp8Format::E5M2.decode(0x7C), f32::INFINITY);
        assert!(Fp8Format::E4M3.decode(0xFF).is_nan());
        // 1.8 lies between 1.75 (0x3E) and 1.875 (0x3F); nearest is 1.75.
        assert_eq!(Fp8Format::E4M3.encode(1.8), 0x3E);
        assert_eq!(Fp8Format::E4M3.encode(-2.1), 0xC0);
    }

    #[test]
    fn ties_round_to_even() {
        for format in FORMATS {
            for code in 0..format.max_code() {
                let lo = format.decode(code) as f64;
                let hi = format.decode(code + 1) as f64;
                let mid = ((lo + hi) / 2.0) as f32;
                assert_eq!(mid as f64, (lo + hi) / 2.0, "midpoint exact in f32");
                let even = if code % 2 == 0 { code } else { code + 1 };
                assert_eq!(format.encode(mid), even, "{format} tie between {lo} and {hi}");
                assert_eq!(format.encode(-mid), 0x80 | even);
                // Just off the tie goes to the nearer neighbour.
                assert_eq!(format.encode(f32::from_bits(mid.to_bits() - 1)), code);
                assert_eq!(format.encode(f32::from_bits(mid.to_bits() + 1)), code + 1);
            }
        }
    }

    #[test]
    fn saturation_and_specials() {
        for format in FORMATS {
            let max = format.max();
            assert_eq!(format.encode(max), format.max_code());
            assert_eq!(format.encode(f32::from_bits(max.to_bits() + 1)), format.max_code());
            assert_eq!(format.encode(max * 1.5), format.max_code());
            assert_eq!(format.encode(f32::MAX), format.max_code());
            assert_eq!(format.encode(f32::INFINITY), format.max_code());
            assert_eq!(format.encode(f32::NEG_INFINITY), 0x80 | format.max_code());
            assert_eq!(format.encode(f32::NAN), format.nan_code());
            assert_eq!(format.encode(-f32::NAN), 0x80 | format.nan_code());
            assert_eq!(format.encode(0.0), 0x00);
            assert_eq!(format.encode(-0.0), 0x80);
            // f32 subnormals are far below the FP8 grid.
            assert_eq!(format.encode(f32::from_bits(1)), 0x00);
            assert_eq!(format.encode(-f32::MIN_POSITIVE), 0x80);
            // Half the smallest subnormal is a tie with zero: even is zero.
            let step = format.subnormal_step();
            assert_eq!(format.encode(step / 2.0), 0x00);
            assert_eq!(format.encode(step * 0.51), 0x01);
        }
    }

    /// Brute force: the code nearest to x (ties to even), by scanning the table.
    fn nearest(format: Fp8Format, x: f32) -> u8 {
        let x = x as f64;
        let mut best = 0u8;
        let mut best_err = f64::INFINITY;
        for code in 0..=format.max_code() {
            let err = (format.decode(code) as f64 - x.abs()).abs();
            if err < best_err || (err == best_err && code % 2 == 0) {
                best = code;
                best_err = err;
            }
        }
        if x.is_sign_negative() {
            best | 0x80
        } else {
            best
        }
    }

    #[test]
    fn random_inputs_match_brute_force() {
        // xorshift: deterministic, fresh bit patterns over the whole f32 range of interest.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for format in FORMATS {
            for i in 0..200_000 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let x = match i % 3 {
                    // Uniform bits: covers subnormals, huge values and everything between.
                    0 => f32::from_bits(state as u32),
                    // Magnitudes within and around the format's range.
                    1 => {
                        let exp = (state >> 32) as i32 % 40 - 20;
                        let mant = (state as u32 >> 9) as f32 / (1u32 << 23) as f32;
                        (1.0 + mant) * 2f32.powi(exp) * if state & 1 == 0 { 1.0 } else { -1.0 }
                    }
                    // f32 subnormals.
                    _ => f32::from_bits((state as u32) & 0x807F_FFFF),
                };
                if x.is_nan() {
                    continue;
                }
                let expected = if x.abs() > format.max() { (if x < 0.0 { 0x80 } else { 0 }) | format.max_code() } else { nearest(format, x) };
                assert_eq!(format.encode(x), expected, "{format} x = {x:e} ({:#010x})", x.to_bits());
            }
        }
    }
}
