//! The training text shared by the language-model examples (included with `#[path]`):
//! *Around the World in Eighty Days* (Project Gutenberg eBook #103, public domain) without
//! Project Gutenberg's header and license, and random windows of it.

const CORPUS: &str = include_str!("../../data/around-the-world-in-80-days.txt");

/// The book's text, split 90/10 into training and held-out text.
pub fn corpus() -> (&'static [u8], &'static [u8]) {
    let start = CORPUS.find("*** START OF").and_then(|i| CORPUS[i..].find('\n').map(|j| i + j + 1)).unwrap_or(0);
    let end = CORPUS.find("End of Project Gutenberg").unwrap_or(CORPUS.len());
    let text = CORPUS[start..end].as_bytes();
    text.split_at(text.len() * 9 / 10)
}

/// Windows of `text` at random offsets, from a seeded xorshift.
pub struct Batches<'a> {
    pub text: &'a [u8],
    pub state: u64,
}

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
