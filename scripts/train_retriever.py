"""Train M+ retrievers on top of a trained MemoryLLM (any preset or folder), the language model frozen.

The M+ keeps the MemoryLLM's whole pool as its short-term memory and retrieves `--ltm-blocks`
blocks on top (the comparison `scripts/warm_retention.py` makes: same short-term memory), reading
them where `--retrieved-position` says. Writes `OUT/retriever.safetensors` (the retrievers only,
bfloat16, with the M+ fields in its header), which `warm_retention.py --retriever` reads and
`mplus_with_retrievers` loads; the `smollm2-135m-mplus` preset is that file trained with the command
below (its folder: src/latentmem/presets/smollm2-135m-mplus).

    python scripts/train_retriever.py --model smollm2-135m --out runs/smol-retriever --seconds 900 \
        --ltm-blocks 4 --key-dim 64 --retrieved-position before_newest_write
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentmem.config import MPlusConfig
from latentmem.models import load_model
from latentmem.training.retriever import evaluate_retriever, mplus_from, save_retrievers, train_retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a trained MemoryLLM: preset name or folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=900, help="training budget")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--ltm-blocks", type=int, default=2)
    parser.add_argument("--key-dim", type=int, default=32)
    parser.add_argument("--retrieved-position", default="before_newest_write", choices=MPlusConfig.RETRIEVED_POSITIONS)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--objective", default="slots", choices=("slots", "writes", "both"),
                        help="slot relevance (the release), the answering write's rank among writes, or both")
    parser.add_argument("--temperature", type=float, default=0.05, help="the write objective's softmax temperature")
    parser.add_argument("--stream-length", type=int, default=60, help="documents per training stream")
    parser.add_argument("--negatives", type=int, default=None, help="negative slots sampled per layer (default: all)")
    parser.add_argument("--retrieval-unit", default="slot", choices=("slot", "write"))
    parser.add_argument("--write-candidates", type=int, default=1, help="candidate factor of whole-write search")
    parser.add_argument("--write-ranking", default="per_layer", choices=("per_layer", "first_layer", "tokens"),
                        help="rank writes per layer (learned) or once at the first layer (fixed matching)")
    parser.add_argument("--eval-questions", type=int, default=0, help="held-out retrieval check afterwards (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    base, tokenizer = load_model(args.model)
    model = mplus_from(base, seed=args.seed, num_blocks=base.config.num_blocks + args.ltm_blocks,
                       num_ltm_blocks=args.ltm_blocks, selector_hidden_dim=args.key_dim,
                       retrieved_slots_position=args.retrieved_position,
                       retrieval_unit=args.retrieval_unit, write_ranking=args.write_ranking,
                       write_candidates=args.write_candidates)  # fmt: skip
    del base
    start = time.perf_counter()
    with (args.out / "metrics.jsonl").open("w") as metrics:
        records = train_retriever(model, tokenizer, steps=args.steps, lr=args.lr, seed=args.seed, max_seconds=args.seconds,
                                  objective=args.objective, temperature=args.temperature, negatives=args.negatives,
                                  stream_length=args.stream_length,
                                  log=lambda record: metrics.write(json.dumps(record) + "\n"))  # fmt: skip
    result = {**{k: v for k, v in vars(args).items() if k != "out"},  # the options, then what ran
              "steps_trained": len(records), "train_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    save_retrievers(model, args.out)
    if args.eval_questions:
        result["heldout_retrieval"] = evaluate_retriever(model, tokenizer, questions=args.eval_questions)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
