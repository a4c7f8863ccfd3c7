//! Continuous batching (`model::Batch`): sequences that join and leave between steps get
//! the tokens each gets alone in a `Session`, on the reference backend and on wgpu (the
//! MLA decode kernel over several sequences' pages); bad requests are refused before
//! anything is fed.

use crate::common::{kernel_device, Fused, Ref};
use burn_deepseek::hf::HfModel;
use burn_deepseek::model::ModelBackend;
use burn_deepseek::model::{Batch, Request, Sampling, Session};
use burn_moe::mla::{CacheError, PAGE_SIZE};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/v3_yarn")
}

/// Prompts of several lengths (one beyond a page) and token counts; one with a stop
/// token, one sampled.
fn requests(eos: u32) -> Vec<Request> {
    let text = |s: &str| s.bytes().map(|b| (b % 120) as u32 + 3).collect::<Vec<_>>();
    vec![
        Request::greedy(text("Passepartout"), 8),
        Request::greedy(text("Phileas Fogg, of the Reform Club, London, who had made a bet of twenty thousand pounds"), 12),
        Request { stop: vec![eos], ..Request::greedy(text("Aouda"), 10) },
        Request { sampling: Sampling { temperature: 0.9, top_k: 20, seed: 7 }, ..Request::greedy(text("Mr. Fix"), 9) },
        Request::greedy(text("A"), 5),
    ]
}

fn batch_equals_alone<B: ModelBackend>(device: &B::Device) {
    let hf = HfModel::<B>::open(fixture(), device).unwrap();
    let requests = requests(hf.eos[0]);
    assert!(requests[1].prompt.len() > PAGE_SIZE, "one prompt spans two pages");
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| Session::new(&hf.model, &hf.config.mla, r.prompt.len() + r.max_tokens, r.sampling, device).generate_until(&r.prompt, r.max_tokens, &r.stop, |_| {}).unwrap())
        .collect();

    let pages = 8;
    let mut batch = Batch::new(&hf.model, &hf.config.mla, pages, device);
    let mut got: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut pending = requests.iter().cloned().enumerate().map(|(i, r)| (i as u64, r)).collect::<Vec<_>>().into_iter();
    // Two join at once, one more after each step until all have joined: sequences of
    // different lengths and ages share every step.
    for (id, r) in pending.by_ref().take(2) {
        let d = batch.join(id, r).unwrap();
        got.entry(d.seq).or_default().push(d.token);
    }
    let mut steps = 0;
    while !batch.is_empty() || pending.len() > 0 {
        for d in batch.step().unwrap() {
            got.entry(d.seq).or_default().push(d.token);
        }
        if let Some((id, r)) = pending.next() {
            let d = batch.join(id, r).unwrap();
            got.entry(d.seq).or_default().push(d.token);
        }
        steps += 1;
        assert!(steps < 100, "the batch does not drain");
    }
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&got[&(i as u64)], want, "sequence {i}: batched tokens against the same request alone");
    }
    assert_eq!(batch.free_pages(), pages, "finished sequences freed their pages");
}

#[test]
fn batched_sequences_get_the_tokens_they_get_alone() {
    batch_equals_alone::<Ref>(&Default::default());
}

#[test]
fn batched_sequences_on_the_wgpu_runtime() {
    batch_equals_alone::<Fused>(&kernel_device());
}

#[test]
fn bad_requests_are_refused_before_anything_is_fed() {
    let device = Default::default();
    let hf = HfModel::<Ref>::open(fixture(), &device).unwrap();
    let max = hf.config.mla.max_seq_len;
    let mut batch = Batch::new(&hf.model, &hf.config.mla, 2, &device);
    batch.join(1, Request::greedy(vec![5; 3], 4)).unwrap();
    assert_eq!(batch.join(1, Request::greedy(vec![5; 3], 4)).unwrap_err(), CacheError::DuplicateSequence { id: 1 });
    assert_eq!(batch.join(2, Request::greedy(vec![5; 3], max)).unwrap_err(), CacheError::TooLong { id: 2, len: max + 2, max });
    assert_eq!(batch.join(3, Request::greedy(vec![5; 2 * PAGE_SIZE], 1)).unwrap_err(), CacheError::Full { needed: 2, free: 1 });
    assert_eq!(batch.leave(9).unwrap_err(), CacheError::UnknownSequence { id: 9 });
    assert_eq!((batch.len(), batch.free_pages()), (1, 1), "the refused requests changed nothing");
    // A sequence that fills its page needs a new one at the next step: refused when none
    // is free, and the step goes on once a sequence leaves.
    batch.join(4, Request::greedy(vec![7; PAGE_SIZE], 3)).unwrap();
    assert_eq!(batch.free_pages(), 0);
    assert_eq!(batch.step().unwrap_err(), CacheError::Full { needed: 1, free: 0 });
    batch.leave(1).unwrap();
    let drawn = batch.step().unwrap();
    assert_eq!(drawn.iter().map(|d| d.seq).collect::<Vec<_>>(), [4]);
}

/// Prompts joined in one pass (`Batch::join_all`, a batched prefill) draw the tokens
/// each draws alone, then decode together as before; an id given twice is refused before
/// anything is fed.
fn joined_together_equals_alone<B: ModelBackend>(device: &B::Device) {
    let hf = HfModel::<B>::open(fixture(), device).unwrap();
    let requests = requests(hf.eos[0]);
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| Session::new(&hf.model, &hf.config.mla, r.prompt.len() + r.max_tokens, r.sampling, device).generate_until(&r.prompt, r.max_tokens, &r.stop, |_| {}).unwrap())
        .collect();
    let mut batch = Batch::new(&hf.model, &hf.config.mla, 8, device);
    let twice = vec![(1, requests[0].clone()), (1, requests[1].clone())];
    assert_eq!(batch.join_all(twice).unwrap_err(), CacheError::DuplicateSequence { id: 1 });
    assert_eq!((batch.len(), batch.free_pages()), (0, 8), "the refused call changed nothing");
    let all = requests.iter().cloned().enumerate().map(|(i, r)| (i as u64, r)).collect();
    let mut got: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let first = batch.join_all(all).unwrap();
    assert_eq!(first.iter().map(|d| d.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4], "in the order given");
    for d in first {
        got.entry(d.seq).or_default().push(d.token);
    }
    while !batch.is_empty() {
        for d in batch.step().unwrap() {
            got.entry(d.seq).or_default().push(d.token);
        }
    }
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(&got[&(i as u64)], want, "sequence {i}: joined together against alone");
    }
    assert_eq!(batch.free_pages(), 8);
}

#[test]
fn prompts_prefilled_together_get_the_tokens_they_get_alone() {
    joined_together_equals_alone::<Ref>(&Default::default());
    joined_together_equals_alone::<Fused>(&kernel_device());
}
