"""transformers' side of benches/train.sh: the tiny model of train_tiny trained in PyTorch.

A DeepseekV3ForCausalLM at the shape of DeepSeekV3Config::tiny() without MTP (the TINY
config of decode_transformers.py: vocabulary 256, width 64, 3 layers the first dense, 16
routed experts top-4 of 2/4 groups plus 1 shared, MLA 4 heads), trained as train_tiny
trains with --mtp 0: byte tokens of the same book, `--batch` windows of `--seq` + 1 bytes,
AdamW (lr 3e-3 after a 30-step linear warm-up, betas 0.9/0.999, eps 1e-5, weight decay
0.1), eager PyTorch on the CPU. Prints tokens/s over the steps after the first three (as
train_tiny's Throughput does); with --burn FILE (train_tiny's output) also the ratio.
"""

import argparse
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_transformers import TINY  # noqa: E402  (one definition of the benchmark's shape)
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

BOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "around-the-world-in-80-days.txt")


def training_text():
    """The first 90% of the book without Project Gutenberg's header (examples/common/corpus.rs)."""
    text = open(BOOK, encoding="utf-8").read()
    start = text.find("*** START OF")
    start = text.find("\n", start) + 1 if start >= 0 else 0
    end = text.find("End of Project Gutenberg")
    data = text[start:end if end >= 0 else len(text)].encode("utf-8")
    return data[: len(data) * 9 // 10]


def burn_tokens_per_second(path):
    """The last tokens/s figure of train_tiny's progress line in `path`."""
    figures = re.findall(r"\|\s*([0-9.]+) tok/s", open(path, encoding="utf-8", errors="replace").read())
    if not figures:
        sys.exit(f"{path}: no 'tok/s' figure from train_tiny")
    return float(figures[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--burn", help="train_tiny's output, for the ratio")
    args = p.parse_args()
    if args.steps <= 3 or args.batch < 1 or args.seq < 2:
        sys.exit(f"--steps {args.steps} (more than 3), --batch {args.batch} (at least 1), --seq {args.seq} (at least 2)")

    torch.manual_seed(args.seed)
    draw = random.Random(args.seed)
    text = training_text()
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min((step + 1) / 30.0, 1.0))
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads): "
          f"DeepseekV3ForCausalLM at train_tiny's shape without MTP, batch {args.batch} x {args.seq}, AdamW, {args.steps} steps")
    tokens, seconds = 0, 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        rows = []
        for _ in range(args.batch):
            at = draw.randrange(len(text) - args.seq - 1)
            rows.append(list(text[at:at + args.seq + 1]))
        ids = torch.tensor(rows)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        if step > 3:
            seconds += time.perf_counter() - start
            tokens += args.batch * args.seq
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:>5} loss {loss.item():.3f} | {tokens / max(seconds, 1e-9):>7.0f} tok/s", flush=True)
    hf = tokens / seconds
    print(f"transformers: {hf:.0f} tokens/s")
    if args.burn:
        burn = burn_tokens_per_second(args.burn)
        print(f"\n{'':>14} {'tokens/s':>10}\n{'burn-deepseek':>14} {burn:>10.0f}\n{'transformers':>14} {hf:>10.0f}\n{'ratio':>14} {burn / hf:>9.2f}x")


if __name__ == "__main__":
    main()
