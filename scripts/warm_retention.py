"""Retention in a memory already in use, and what perfect long-term retrieval would add.

`latentmem eval retention` writes each sample's context into an empty memory by default, which
tiles that one write over the whole pool (N / K copies of every slot), so the context outlives many
more writes than it would among older ones. This diagnostic measures the realistic case: every
stream first writes `--warmup` filler passages, then the fact document, then filler, and after each
checkpoint asks the document's questions three ways, with the same short-term memory:

- `memoryllm`: the short-term pool alone (N slots, as the MemoryLLM model reads it);
- `mplus`: M+ with the same short-term pool plus `--ltm-blocks` blocks retrieved from the slots the
  pool evicted (a learned retriever from `--retriever`, else untrained);
- `oracle`: M+ whose retrieval returns the document's own evicted slots (then random others), the
  ceiling a perfect retriever would reach with this language model.

`--retrieved-position` places M+'s retrieved slots (`MPlusConfig.retrieved_slots_position`):
"first" (before the short-term pool, as the release), "before_newest_write" or "last".

`--pin-document` pins the document (M+'s `importance=inf` with up to a quarter of the pool spared
by drops), so all its slots stay in the short-term pool: that separates losing slots from reading
far back.

Scoring is teacher-forced exact hit: every answer token is the model's argmax given the question and
the answer so far, which is what greedy decoding of the answer checks.

    python scripts/warm_retention.py --model tiny --retriever runs/tiny-mplus/final
    python scripts/warm_retention.py --model smollm2-135m --documents 12 --checkpoints 0,10,30,50 --ltm-blocks 4 --key-dim 64
"""

from __future__ import annotations

import argparse
import time

import torch

from latentmem.config import MPlusConfig
from latentmem.data.filler import FillerStream, filler_paragraphs
from latentmem.data.synthetic import FactGenerator
from latentmem.modeling import MemoryLLM
from latentmem.models import load_model
from latentmem.positions import MEMORY_POSITIONS
from latentmem.training.retriever import answer_first_retrieval, load_retrievers, mplus_from
from latentmem.training.tasks import qa_ids

WAYS = ("memoryllm", "mplus", "oracle")


@torch.no_grad()
def answers_exactly(model, memory, prompt: torch.Tensor, answer: torch.Tensor, way: str, injection_id: int,
                    generator: torch.Generator) -> bool:  # fmt: skip
    """Whether every answer token (the end token aside) is the argmax after the prompt and the answer so far."""
    ids = torch.cat([prompt, answer])[None]
    if way == "memoryllm":
        logits = MemoryLLM.forward(model, ids, memory=memory, use_cache=False, focused=False).logits  # short-term pool only
    else:
        choose = answer_first_retrieval(injection_id, generator) if way == "oracle" else None
        logits = model(ids, memory=memory, use_cache=False, retrieve_fn=choose).logits
    start = prompt.numel() - 1
    return bool((logits[0, start : start + answer.numel() - 1].argmax(-1) == answer[:-1]).all())


def retriever_weights(path: str) -> dict:
    """The `retrievers` state dict from an M+ model folder or a retriever.safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    trained, _ = load_model(path)
    return trained.retrievers.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a trained MemoryLLM: preset name or folder")
    parser.add_argument("--retriever", help="retrievers to use: an M+ folder (e.g. runs/tiny-mplus/final) or the "
                        "retriever.safetensors of scripts/train_retriever.py")  # fmt: skip
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--checkpoints", default="0,2,5,10,20")
    parser.add_argument("--warmup", type=int, default=10, help="filler writes before the document")
    parser.add_argument("--ltm-blocks", type=int, default=2, help="blocks of K slots retrieved from long-term memory")
    parser.add_argument("--key-dim", type=int, default=32, help="retriever key size (must match --retriever)")
    parser.add_argument("--retrieved-position", default="first", choices=MPlusConfig.RETRIEVED_POSITIONS)
    parser.add_argument("--memory-positions", choices=MEMORY_POSITIONS,
                        help="read with this memory layout instead of the model's own (see latentmem.positions)")
    parser.add_argument("--retrieval-unit", default="slot", choices=("slot", "write"))
    parser.add_argument("--write-ranking", default="per_layer", choices=("per_layer", "first_layer", "tokens"),
                        help="whole writes ranked per layer (learned retrievers) or once at the first layer (fixed)")
    parser.add_argument("--write-candidates", type=int, default=1)
    parser.add_argument("--blocks", type=int, help="read with a short-term pool of this many blocks of K slots")
    parser.add_argument("--pin-document", action="store_true", help="keep the document's slots in the short-term pool")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which reads to score, of {','.join(WAYS)}")
    parser.add_argument("--seed", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    ways = [way for way in WAYS if way in args.ways.split(",")]

    base, tokenizer = load_model(args.model)
    if args.memory_positions:
        base.config.memory_positions = args.memory_positions
    if args.blocks:  # no weight depends on the pool size
        base.config.num_blocks = args.blocks
    # Same short-term pool as the MemoryLLM (its num_blocks), plus the retrieved blocks on top.
    model = mplus_from(base, num_blocks=base.config.num_blocks + args.ltm_blocks, num_ltm_blocks=args.ltm_blocks,
                       selector_hidden_dim=args.key_dim, retrieved_slots_position=args.retrieved_position,
                       protect_pinned_fraction=0.25 if args.pin_document else 0.0,
                       retrieval_unit=args.retrieval_unit, write_ranking=args.write_ranking,
                       write_candidates=args.write_candidates)  # fmt: skip
    del base
    if args.retriever:
        load_retrievers(model, retriever_weights(args.retriever))
    print(f"short-term slots {model.config.memory_size}, retrieved {model.config.retrieved_slots}, "
          f"retriever: {args.retriever or 'untrained'}, retrieved slots: {args.retrieved_position}", flush=True)  # fmt: skip

    facts = FactGenerator(args.seed, "heldout", (1, 2))
    filler = FillerStream(filler_paragraphs(source="stdlib"), args.seed + 1)
    generator = torch.Generator().manual_seed(0)
    hits = {n: dict.fromkeys(ways, 0) for n in checkpoints}
    asked = dict.fromkeys(checkpoints, 0)
    start = time.perf_counter()
    for i in range(args.documents):
        document, memory = facts.document(), model.new_memory(args.seed + i)
        for _ in range(args.warmup):
            model.inject(memory, text=filler.passage(20, 45), tokenizer=tokenizer, allow_short=True)
        importance = float("inf") if args.pin_document else 1.0
        fact = model.inject(memory, text=document.text, tokenizer=tokenizer, allow_short=True, importance=importance)
        written = 0  # distractors written after the fact so far
        for n in checkpoints:
            for _ in range(n - written):
                model.inject(memory, text=filler.passage(20, 45), tokenizer=tokenizer, allow_short=True)
            written = n
            for qa in document.qa:
                prompt, answer = qa_ids(tokenizer, qa)
                for way in ways:
                    hits[n][way] += answers_exactly(model, memory, prompt, answer, way, fact.injection_id, generator)
                asked[n] += 1
        print(f"document {i + 1}/{args.documents}, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n| distractors | questions | {' | '.join(ways)} |\n|---|---|{'---|' * len(ways)}")
    for n in checkpoints:
        print(f"| {n} | {asked[n]} | " + " | ".join(f"{hits[n][way] / asked[n]:.2f}" for way in ways) + " |")


if __name__ == "__main__":
    main()
