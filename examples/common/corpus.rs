//! The training text shared by the language-model examples (included with `#[path]`):
//! *Around the World in Eighty Days* (Project Gutenberg eBook #103, public domain) without
//! Project Gutenberg's header and license, and random windows of it.

const CORPUS: &str = include_str!("../../data/around-the-world-in-80-days.txt");

/// The book's text, split 90/10 into training and held-out text.
pub fn corpus() -> (&'static [u8], &'static [u8]) {
    let start = CORPUS.find("*** START OF").and_then(|i| CORPUS[i..].find('\n').map(|j| i + j + 1)).unwrap_or(0);
    let end = CORPUS.find("End of Project Gutenberg").unwrap_or(CORPUS.len());
    let text = &CORPUS.as_bytes()[start..end];
    text.split_at(text.len() * 9 / 10)
}

/// Windows of `text` at random offsets, from a seeded xorshift.
#[allow(dead_code)] // fp8_train's; train_tiny draws with global_rows
pub struct Batches<'a> {
    pub text: &'a [u8],
    pub state: u64,
}

#[allow(dead_code)]
impl Batches<'_> {
    /// `b` windows of `n` bytes, one after the other.
    pub fn next(&mut self, b: usize, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(b * n);
        for _ in 0..b {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let start = (self.state % (self.text.len() - n) as u64) as usize;
            out.extend_from_slice(&self.text[start..start + n]);
        }
        out
    }
}

/// Rows `first .. first + rows` of step `step`'s global batch: each row a window of `n`
/// bytes at an offset drawn from `(seed, step, row)` alone, so that any split of the
/// batch among ranks, on any world size, reads the same rows, and the position in the
/// stream is the step.
#[allow(dead_code)] // train_tiny's; fp8_train draws with Batches
pub fn global_rows(text: &[u8], seed: u64, step: usize, first: usize, rows: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * n);
    for row in first..first + rows {
        // splitmix64 of the three coordinates.
        let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let start = (z % (text.len() - n) as u64) as usize;
        out.extend_from_slice(&text[start..start + n]);
    }
    out
}

/// The held-out rows every language-model example scores: the first 16 consecutive
/// windows of `n` bytes of `text` (fewer if it is shorter), as `(bytes, rows)`.
#[allow(dead_code)] // train_tiny's and train_learner's
pub fn held_out_rows(text: &[u8], n: usize) -> (Vec<u8>, usize) {
    let bytes: Vec<u8> = text.chunks_exact(n).take(16).flatten().copied().collect();
    let rows = bytes.len() / n;
    (bytes, rows)
}
