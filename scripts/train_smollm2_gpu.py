"""Train smollm2-135m's memory adapter, or its M+ retriever, on whatever device there is.

One job per process: `memoryllm` trains the adapter (fresh, or `--recipe continue --init` from an
existing one) and measures held-out recall; `mplus` trains the retrievers on top of an adapter and
compares recall after 0/10/50 distractors with and without long-term memory. `run_smollm2_gpu.sh`
runs the `mplus` job on one GPU. (Several jobs sharing one H200 as separate processes ran at ~0.7 s
per episode each, measured: the loop is host-bound, so side-by-side jobs do not pay.)

    python scripts/train_smollm2_gpu.py memoryllm --out DIR --seconds 300 --recipe fresh --lr 2e-3 --batch 8
    python scripts/train_smollm2_gpu.py memoryllm --out DIR --seconds 300 --recipe continue --init ADAPTER_DIR
    python scripts/train_smollm2_gpu.py memoryllm --out DIR --seconds 1200 --steps 200 --recipe copy --lr 5e-4 \
        --batch 4 --init ADAPTER_DIR
    python scripts/train_smollm2_gpu.py mplus --out DIR --seconds 200 --adapter ADAPTER_DIR

`--seconds` is the training budget: a MemoryLLM job first times a few steps (unless `--steps` is
given), then sizes its curriculum to the budget (the cosine schedule ends with the budget instead of
being cut off). Each job writes `DIR/result.json` (held-out recall, as the shipped adapter was
measured) and its weights (`DIR/run/adapter/memory_adapter.safetensors` or `DIR/retriever.safetensors`).
`LATENTMEM_SMOKE=1` swaps the base for a randomly initialised SmolLM2-shaped model (tokenizer and
config from `LATENTMEM_SMOKE_TOKENIZER`): a quick check of the whole pipeline without the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from latentmem.presets import adapter, preset_path
from latentmem.training import presets
from latentmem.training.recall import recall_accuracy
from latentmem.training.trainer import Stage

SHIPPED = preset_path("smollm2-135m")
# The held-out set the shipped adapter was measured on (README model card).
HELDOUT = {"seed": 20_000, "facts_per_document": (1, 2)}


def smoke_backbone(dtype=torch.float32):
    """A randomly initialised model of SmolLM2's shape, for pipeline checks without the weights."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = os.environ["LATENTMEM_SMOKE_TOKENIZER"]
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype).eval(), AutoTokenizer.from_pretrained(folder)


def recipe(name: str, steps: int) -> list[Stage]:
    """`fresh`: the first recipe's shape, longer; `continue`: more full-pool training of an adapter;
    `copy`: one-document episodes of which 30% ask for the document itself back from memory (every
    token scored: practice in copying faithfully; README: better in empty memories, worse in used ones);
    `lasting`: warm pools and reads of targets written up to 30 writes back (`presets.SMOLLM2_LASTING`);
    `single`: one-document episodes only, each written into an empty memory and read from its K slots
    alone: exactly what a focused read of an isolated write sees (the shipped presets' way), a quarter
    of them reading a write that does not answer them (general prompts, English text)."""
    if name == "single":
        return [Stage(steps, num_blocks=1, reset_memory=1.0, unrelated=0.25)]
    if name == "copy":
        return [Stage(steps, num_blocks=1, reset_memory=1.0, copy_fraction=0.3)]
    if name == "lasting":  # the preset's reads of older memory, stretched to the budget (32-block pools)
        total = sum(stage.steps for stage in presets.SMOLLM2_LASTING)
        return [replace(stage, steps=max(1, round(steps * stage.steps / total)), num_blocks=32)
                for stage in presets.SMOLLM2_LASTING]  # fmt: skip
    one_document = {"fresh": 0.6, "continue": 0.3}[name]
    first = max(1, round(steps * one_document))
    return [Stage(first, num_blocks=1, reset_memory=1.0), Stage(max(1, steps - first), num_blocks=16, max_contexts=4)]


def seconds_per_step(args, out: Path) -> float:
    """Time a few full-pool steps (the slower stage) at lr 0, so the model is left as it was."""
    probe = out / "probe"
    presets.train_preset("smollm2-135m", probe, init=args.init, seed=args.seed, progress=False,
                         stages=[Stage(6, num_blocks=16, max_contexts=4)], batch_size=args.batch, lr=0.0,
                         log_every=1, final_eval=False, save_every=0)  # fmt: skip
    elapsed = [json.loads(line)["elapsed_s"] for line in (probe / "metrics.jsonl").open()]
    return (elapsed[-1] - elapsed[1]) / (len(elapsed) - 2)  # skip the first steps' warm-up


def train_memoryllm(args, out: Path) -> dict:
    start = time.monotonic()
    per_step = seconds_per_step(args, out) if args.steps is None else None
    steps = args.steps or max(2, int((args.seconds - (time.monotonic() - start)) / per_step * 0.9))
    stages = recipe(args.recipe, steps)
    print(f"{out.name}: {per_step} s/step -> {steps} steps {stages}", flush=True)
    presets.train_preset("smollm2-135m", out / "run", init=args.init, seed=args.seed, progress=False,
                         max_minutes=max(0.1, (args.seconds - (time.monotonic() - start)) / 60), stages=stages,
                         batch_size=args.batch, lr=args.lr, warmup_steps=10, log_every=10, final_eval=False,
                         save_every=0)  # fmt: skip
    record = json.loads((out / "run" / "preset.json").read_text())
    model, tokenizer = presets.load_smollm2_preset(out / "run" / "adapter", device=args.device)
    result = {"job": out.name, "recipe": args.recipe, "init": str(args.init), "lr": args.lr, "batch": args.batch,
              "seconds_per_step": per_step, "planned_steps": steps, **record}  # fmt: skip
    save(out, result)
    eval_start = time.monotonic()
    result["heldout"] = recall_accuracy(model, tokenizer, num_documents=args.eval_docs, distractors=(0, 10), **HELDOUT)
    result["eval_seconds"] = round(time.monotonic() - eval_start, 1)
    return save(out, result)


def train_mplus(args, out: Path) -> dict:
    from safetensors.torch import save_file

    from latentmem.training.retriever import evaluate_retriever, mplus_from, train_retriever

    model, tokenizer = presets.load_smollm2_preset(args.adapter, device=args.device)
    mplus = mplus_from(model, seed=args.seed, num_ltm_blocks=args.ltm_blocks, selector_hidden_dim=args.selector_dim,
                       retrieval_unit=args.retrieval_unit, retrieved_slots_position="before_newest_write")  # fmt: skip
    result = {"job": out.name, "adapter": str(args.adapter), "num_ltm_blocks": args.ltm_blocks,
              "selector_hidden_dim": args.selector_dim}  # fmt: skip
    with (out / "metrics.jsonl").open("w") as metrics:
        start = time.monotonic()
        records = train_retriever(mplus, tokenizer, steps=1_000_000, max_seconds=args.seconds, batch_size=args.batch,
                                  lr=args.lr, seed=args.seed, progress=False,
                                  log=lambda r: metrics.write(json.dumps(r) + "\n"))  # fmt: skip
    result.update(steps=len(records), train_seconds=round(time.monotonic() - start, 1))
    retrievers = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in mplus.state_dict().items()
                  if k.startswith("retrievers.")}  # fmt: skip
    save_file(retrievers, out / "retriever.safetensors")
    save(out, result)
    distractors = (0, 10, 50) if not os.environ.get("LATENTMEM_SMOKE") else (0, 3)
    for name, reader in (("mplus", mplus), ("memoryllm", model)):  # M+ first: the number that matters most
        eval_start = time.monotonic()
        result[name] = recall_accuracy(reader, tokenizer, num_documents=args.eval_docs, distractors=distractors,
                                       **HELDOUT)  # fmt: skip
        result[f"{name}_eval_seconds"] = round(time.monotonic() - eval_start, 1)
        save(out, result)
    result["retrieval"] = evaluate_retriever(mplus, tokenizer, questions=40)
    return save(out, result)


def save(out: Path, result: dict) -> dict:
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", choices=["memoryllm", "mplus"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="training budget")
    parser.add_argument("--steps", type=int, default=None, help="memoryllm: this many steps instead of timing a few")
    parser.add_argument("--recipe", choices=["fresh", "continue", "copy", "lasting", "single"], default="fresh")
    parser.add_argument("--init", type=Path, default=None, help="memory adapter to start from (memoryllm)")
    parser.add_argument("--adapter", type=Path, default=SHIPPED, help="memory adapter M+ builds on (mplus)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ltm-blocks", type=int, default=4)
    parser.add_argument("--retrieval-unit", choices=["slot", "write"], default="write")
    parser.add_argument("--selector-dim", type=int, default=64)
    parser.add_argument("--eval-docs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    if os.environ.get("LATENTMEM_SMOKE"):
        presets.load_smollm2_backbone = adapter.load_smollm2_backbone = smoke_backbone  # training and loading
        args.eval_docs = min(args.eval_docs, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (train_memoryllm if args.job == "memoryllm" else train_mplus)(args, args.out)


if __name__ == "__main__":
    main()
