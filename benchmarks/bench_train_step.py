#!/usr/bin/env python
"""Benchmark one training step: episodes batched across memory states versus one at a time.

Two kinds of episode, as the curricula use them:
- `--stage first` (default): every episode writes its document into an empty memory and answers
  from the new slots alone (`Stage(reset_memory=1.0)`: the smollm2-135m preset's 240 of 280 steps,
  the tiny preset's 600). `MemoryObjective` batches writes and reads (`write_losses`).
- `--stage pool`: pools of `--blocks` blocks hold older writes; each episode writes 1-4 contexts
  without gradient, then answers from its whole pool. Each round of writes (every episode's r-th
  context) is one batch (`inject_batch`), and so are the reads (`pool_read_losses`).
The baseline, measured in the same run, is `run_episode` per episode, as every episode ran before.
Both compute the same losses and gradients (tests/test_training.py).

Each timing is forward + backward of a batch of random-token episodes (documents of 15-35 tokens,
targets of 20-40 with the last 6 scored), median over --reps rounds, the two methods interleaved.

    python benchmarks/bench_train_step.py                            # tiny's shape, batch 12 (~1 min on 2 cores)
    python benchmarks/bench_train_step.py --stage pool               # tiny's 8-block stage
    python benchmarks/bench_train_step.py --shape smollm2 --batch 4  # SmolLM2-135M's shape, random weights
    python benchmarks/bench_train_step.py --shape smollm2 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig

from latentmem import MemoryLLM
from latentmem.config import DEFAULT_LORA, MemoryLLMConfig
from latentmem.state import MemoryState
from latentmem.training import Episode, MemoryObjective, trainable_parameters
from latentmem.training.objective import IGNORE

SHAPES = {  # (layers, hidden, heads, kv heads, intermediate, vocab, K, LoRA, train_all)
    "tiny": (4, 128, 4, 4, 384, 1024, 64, None, True),
    "smollm2": (30, 576, 9, 3, 1536, 49152, 32, DEFAULT_LORA, False),
}


def build(shape: str, device: str) -> MemoryLLM:
    layers, hidden, heads, kv, inter, vocab, k, lora, _ = SHAPES[shape]
    backbone = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = MemoryLLM(MemoryLLMConfig(backbone_config=backbone, num_tokens=k, num_blocks=1, lora=lora))
    return model.to(device).train()


def episodes(batch: int, vocab: int, seed: int, pool: bool) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)

    def document() -> torch.Tensor:
        return torch.randint(0, vocab, (int(torch.randint(15, 36, (1,), generator=g)),), generator=g)

    out = []
    for _ in range(batch):
        contexts = [document() for _ in range(int(torch.randint(1, 5, (1,), generator=g)) if pool else 1)]
        target = torch.randint(0, vocab, (int(torch.randint(20, 40, (1,), generator=g)),), generator=g)
        labels = target.clone()
        labels[:-6] = IGNORE  # the answer: the last few tokens
        out.append(Episode(contexts, target, labels, answer_context=None if pool else 0))
    return out


def step_seconds(model: MemoryLLM, objective: MemoryObjective, batch: list[Episode], batched: bool,
                 blocks: int) -> float:  # fmt: skip
    b, K = model.backbone.config, model.config.num_tokens
    states = [MemoryState(b.num_hidden_layers, blocks * K, b.hidden_size, dtype=model.dtype, device=model.device,
                          seed=i, fingerprint=model.fingerprint) for i in range(len(batch))]  # fmt: skip
    if blocks > 1:  # older writes fill the pool
        for state in states:
            model.inject(state, input_ids=torch.randint(0, b.vocab_size, (K,)), allow_short=True)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    if batched:
        loss, _ = objective(batch, states)
    else:
        results = [objective.run_episode(e, s) for e, s in zip(batch, states)]
        loss = torch.stack([r.loss_sum for r in results]).sum() / sum(r.num_labels for r in results)
    loss.backward()
    sync()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--stage", choices=["first", "pool"], default="first")
    parser.add_argument("--blocks", type=int, default=8, help="pool size in blocks of K slots (--stage pool)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.shape, args.device)
    trainable_parameters(model, train_all=SHAPES[args.shape][-1])
    objective = MemoryObjective(model)
    times: dict[str, list[float]] = {"one at a time": [], "batched": []}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        batch = episodes(args.batch, model.backbone.config.vocab_size, seed=rep, pool=args.stage == "pool")
        blocks = args.blocks if args.stage == "pool" else 1
        for name, values in times.items():
            seconds = step_seconds(model, objective, batch, batched=name == "batched", blocks=blocks)
            if rep:
                values.append(seconds)
    baseline = statistics.median(times["one at a time"])
    pool = f" blocks={args.blocks}" if args.stage == "pool" else ""
    print(f"shape={args.shape} stage={args.stage}{pool} batch={args.batch} device={args.device} "
          f"threads={torch.get_num_threads()} reps={args.reps}")  # fmt: skip
    print(f"{'method':<14} {'s/step':>8} {'episodes/s':>11} {'speed-up':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14} {median:>8.3f} {args.batch / median:>11.1f} {baseline / median:>8.2f}x")


if __name__ == "__main__":
    main()
