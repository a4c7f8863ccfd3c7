//! The test suites' one generator: seeded xorshift whose seed comes from `TEST_SEED` or, by
//! default, from the test's name (FNV-1a), so that every run draws the same inputs and a
//! failure printed with its seed reproduces with `TEST_SEED=<seed>`. Other seeds explore
//! other inputs. Shared by tests/fp8, tests/moe and tests/model (`#[path]`).

#![allow(dead_code)] // each suite uses the draws it needs

/// `TEST_SEED`, or else the FNV-1a hash of `test`'s name.
pub fn seed(test: &str) -> u64 {
    std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)))
}

/// Seeded xorshift (see the module).
pub struct Rng(u64);

impl Rng {
    /// The generator of `test`, its seed printed.
    pub fn new(test: &str) -> Self {
        let seed = seed(test);
        eprintln!("{test}: TEST_SEED={seed}");
        Rng(seed | 1)
    }

    /// A generator from a known seed (a seed drawn by [`Rng::new`] and shared).
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-2, 2).
    pub fn uniform(&mut self) -> f32 {
        self.unit() * 4.0 - 2.0
    }

    /// Values from {-1, -0.5, 0, 0.5, 1}: most rows hold ties.
    pub fn coarse(&mut self) -> f32 {
        (self.next_u64() % 5) as f32 * 0.5 - 1.0
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values uniform in [-2, 2), none zero.
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let v = self.uniform();
                if v != 0.0 {
                    break v;
                }
            })
            .collect()
    }

    /// Standard normal (Box-Muller), never exactly zero.
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-7);
        let u2 = self.unit();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
        if z == 0.0 {
            1e-3
        } else {
            z
        }
    }

    /// `[rows, cols]` normal values, each row scaled by 10^u with u uniform in [-2, 2], so
    /// that 1×128 tiles get scales across four decades (activations: tokens differ in size).
    pub fn matrix(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        self.matrix_blocks(rows, cols, 1)
    }

    /// As [`Rng::matrix`], with one magnitude per `block_rows` rows (weights: a 128×128
    /// block shares its scale, so its rows are drawn at one magnitude).
    pub fn matrix_blocks(&mut self, rows: usize, cols: usize, block_rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * cols);
        let mut magnitude = 1.0;
        for r in 0..rows {
            if r % block_rows == 0 {
                magnitude = 10f32.powf(self.unit() * 4.0 - 2.0);
            }
            out.extend((0..cols).map(|_| self.normal() * magnitude));
        }
        out
    }
}
