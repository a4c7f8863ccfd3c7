"""transformers' side of benches/decode.sh.

--write DIR: writes the benchmark checkpoint, a random DeepseekV3ForCausalLM at the shape of
  DeepSeekV3Config::tiny() without MTP (vocabulary 256, width 64, 3 layers the first dense,
  16 routed experts top-4 of 2/4 groups plus 1 shared, MLA 4 heads, q_lora 48, kv_lora 32),
  its weights re-drawn as tests/fixtures/hf/make_fixtures.py does, and a 256-token tokenizer.
--model DIR: greedy `generate` at each batch size on the prompts of examples/decode_bench.rs
  (token i of sequence b is 3 + (7b + 13i) mod (vocab - 3)); prints prefill and decode
  tokens/s in decode_bench's format, with --burn FILE (decode_bench's output) the ratio.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf"))
import make_fixtures  # noqa: E402  (one definition of the weights' re-draw and the tokenizer)
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, n_routed_experts=16,
            num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc", norm_topk_prob=True,
            routed_scaling_factor=1.0, n_shared_experts=1, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            num_nextn_predict_layers=0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def write(folder):
    config = DeepseekV3Config(**TINY)
    model = DeepseekV3ForCausalLM(config).eval()
    make_fixtures.redraw(model, torch.Generator().manual_seed(7))
    model.save_pretrained(folder, safe_serialization=True)
    make_fixtures.tokenizer(config.vocab_size).save_pretrained(folder)


def prompts(b, length, vocab):
    return torch.tensor([[3 + (7 * s + 13 * i) % (vocab - 3) for i in range(length)] for s in range(b)])


def bench(args):
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads): "
          f"{args.model}, prompt {args.prompt} tokens, {args.tokens} tokens per sequence, greedy")
    print(f"{'batch':>6} {'prefill tok/s':>16} {'decode tok/s':>16}")
    rows = {}
    for b in args.batch:
        ids = prompts(b, args.prompt, vocab)
        mask = torch.ones_like(ids)

        def run(n):
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
            assert out.shape == (b, args.prompt + n), out.shape
            return time.perf_counter() - start

        run(2)  # warm-up
        prefill = min(run(1) for _ in range(args.repeat))
        full = min(run(args.tokens) for _ in range(args.repeat))
        rows[b] = (b * args.prompt / prefill, b * (args.tokens - 1) / max(full - prefill, 1e-9))
        print(f"{b:>6} {rows[b][0]:>16.0f} {rows[b][1]:>16.0f}")
    if args.burn:
        burn = {}
        for line in open(args.burn):
            parts = line.split()
            # batch, prefill one prompt per pass (join), all prompts in one pass (join_all), decode
            if len(parts) == 4 and parts[0].isdigit():
                burn[int(parts[0])] = (float(parts[2]), float(parts[3]))
        print(f"\n{'batch':>6} {'burn prefill':>13} {'transformers':>13} {'ratio':>7} {'burn decode':>12} {'transformers':>13} {'ratio':>7}")
        for b, (hf_prefill, hf) in rows.items():
            if b in burn:
                (prefill, decode) = burn[b]
                print(f"{b:>6} {prefill:>13.0f} {hf_prefill:>13.0f} {prefill / hf_prefill:>6.2f}x {decode:>12.0f} {hf:>13.0f} {decode / hf:>6.2f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--write")
    p.add_argument("--model")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--burn")
    args = p.parse_args()
    if args.write:
        write(args.write)
    if args.model:
        bench(args)


if __name__ == "__main__":
    main()
