"""Retention in one long stream of writes: facts among facts and English text, each asked later.

`warm_retention.py` gives every document its own memory. Here one memory takes one stream, as a
user's memory does: `--warmup` passages first, then a fact document every `--gap` writes (English
passages between), each of its questions asked exactly 0, 10, 50, ... writes after it (the other
facts count as later writes: they are the hardest distractors). Every read way answers the same
question on the same memory at the same moment:

- `memoryllm`: the short-term pool alone;
- `mplus`: M+'s unfocused read (short-term pool plus what it retrieves from long-term memory);
- `focused1`, `focused2`, ...: the focused read of that many writes (`MPlusConfig.focused_writes`);
- `alone`: the fact document written alone into an empty memory, its question read focused: what a
  focused read of an isolated write sees when the ranking finds it and it is whole (the ceiling).

Scoring is teacher-forced exact hit: every answer token is the model's argmax given the question
and the answer so far (what greedy decoding of the answer checks).

    python scripts/stream_retention.py --facts 100 --checkpoints 0,10,50 --ways mplus,focused1
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from latentmem.chat import memory_ids
from latentmem.data.filler import FillerStream, filler_paragraphs
from latentmem.data.notes import NoteGenerator
from latentmem.data.synthetic import FactGenerator
from latentmem.modeling import MemoryLLM
from latentmem.models import load_model
from latentmem.segments import text_chunks
from latentmem.training.tasks import qa_ids


@torch.no_grad()
def answers_exactly(model, memory, prompt: torch.Tensor, answer: torch.Tensor, way: str) -> bool:
    """Whether every answer token (the end token aside) is the argmax after the prompt and the answer so far."""
    ids = torch.cat([prompt, answer])[None]
    if way == "memoryllm":  # the short-term pool as it is
        logits = MemoryLLM.forward(model, ids, memory=memory, use_cache=False, focused=False).logits
    else:
        focused = int(way.removeprefix("focused")) if way.startswith("focused") else 0
        saved, model.config.focused_writes = model.config.focused_writes, focused
        try:
            # focused reads rank writes by the question alone, as in generation (not by the answer's tokens)
            logits = model(ids, memory=memory, use_cache=False, ranking_ids=prompt[None]).logits
        finally:
            model.config.focused_writes = saved
    start = prompt.numel() - 1
    return bool((logits[0, start : start + answer.numel() - 1].argmax(-1) == answer[:-1]).all())


def write_text(model, tokenizer, memory, text: str, max_write_tokens: int | None) -> list[int]:
    """Write `text` (one write, or cut by `segments.text_chunks`); returns the injection ids."""
    if not max_write_tokens:
        return [model.inject(memory, text=text, tokenizer=tokenizer, allow_short=True).injection_id]
    chunks = text_chunks(lambda part: memory_ids(tokenizer, part), text, max_write_tokens, 8)
    return [model.inject(memory, input_ids=torch.tensor(c), allow_short=True).injection_id for c in chunks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-mplus")
    parser.add_argument("--facts", type=int, default=100, help="fact documents (one question each)")
    parser.add_argument("--gap", type=int, default=2, help="writes from one fact to the next")
    parser.add_argument("--warmup", type=int, default=10, help="English passages before the first fact")
    parser.add_argument("--checkpoints", default="0,10,50")
    parser.add_argument("--ways", default="memoryllm,mplus,focused1")
    parser.add_argument("--kinds", default="facts,notes", help="fact generators to alternate: facts (biographies), notes")
    parser.add_argument("--isolated-writes", action="store_true", help="write every text alone (isolated_writes)")
    parser.add_argument("--forgetting", choices=["random", "oldest"], help="which slots a write drops (default: the model's)")
    parser.add_argument("--num-blocks", type=int, help="short-term pool of this many blocks of K slots (no weight depends on it)")
    parser.add_argument("--chunk-size", type=int, help="write texts in chunks of at most this many tokens")
    parser.add_argument("--max-write-tokens", type=int,
                        help="write texts cut at line and sentence ends into writes of at most this many tokens "
                             "(segments.text_chunks, as the chat loop cuts them)")  # fmt: skip
    parser.add_argument("--adapter", type=Path, help="read with this memory adapter's weights (a folder, as saved by training)")
    parser.add_argument("--seed", type=int, default=90000)
    parser.add_argument("--out", type=Path, help="write the records and the table here (json)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    ways = args.ways.split(",")
    model, tokenizer = load_model(args.model)
    if args.adapter:
        from latentmem.presets.adapter import load_memory_adapter

        load_memory_adapter(model, args.adapter)
    model.config.isolated_writes = args.isolated_writes or model.config.isolated_writes
    if args.num_blocks:
        model.config.num_blocks = args.num_blocks
    if args.chunk_size:
        model.config.chunk_size = args.chunk_size
    model.config.forgetting = args.forgetting or model.config.forgetting
    if any(way.startswith("focused") or way == "alone" for way in ways):
        model.config.focused_writes = model.config.focused_writes or 1  # writes record what focused reads rank by
    generators = {"facts": FactGenerator(args.seed, "heldout", (1, 2)), "notes": NoteGenerator(args.seed + 1, "heldout")}
    kinds = [generators[k] for k in args.kinds.split(",")]
    filler = FillerStream(filler_paragraphs(source="stdlib"), args.seed + 2)
    rng = random.Random(args.seed)
    memory = model.new_memory(args.seed)

    # the stream: (write index, fact number or None); questions due at write index + checkpoint
    facts = []
    for i in range(args.facts):
        document = kinds[i % len(kinds)].document()
        facts.append((document, rng.choice(document.qa)))
    fact_at = {args.warmup + i * args.gap: i for i in range(args.facts)}
    length = args.warmup + args.facts * args.gap + checkpoints[-1]
    due = defaultdict(list)
    for write, i in fact_at.items():
        for n in checkpoints:
            due[write + n].append((i, n))
    hits = {n: dict.fromkeys(ways, 0) for n in checkpoints}
    asked = dict.fromkeys(checkpoints, 0)
    records, start = [], time.perf_counter()
    focusing = any(way.startswith("focused") for way in ways)
    injection_of, ranked_first = {}, dict.fromkeys(checkpoints, 0)
    for write in range(length):
        text = facts[fact_at[write]][0].text if write in fact_at else filler.passage(20, 45)
        ids = write_text(model, tokenizer, memory, text, args.max_write_tokens)
        if write in fact_at:
            injection_of[fact_at[write]] = ids
        for i, n in due.get(write, []):
            prompt, answer = qa_ids(tokenizer, facts[i][1])
            row = {"fact": i, "after": n, "question": facts[i][1].question, "answer": facts[i][1].answer}
            if focusing:  # does the ranking a focused read uses put the fact's write first?
                ranked = model.rank_writes_for(memory, prompt)
                row["ranked_first"] = len(ranked) > 0 and int(ranked[0]) in injection_of[i]
                ranked_first[n] += row["ranked_first"]
            for way in ways:
                if way == "alone":
                    alone = model.new_memory(args.seed)
                    write_text(model, tokenizer, alone, facts[i][0].text, args.max_write_tokens)
                    row[way] = answers_exactly(model, alone, prompt, answer, "focused1")
                else:
                    row[way] = answers_exactly(model, memory, prompt, answer, way)
                hits[n][way] += row[way]
            asked[n] += 1
            records.append(row)
        if (write + 1) % 25 == 0:
            so_far = {n: {w: round(hits[n][w] / asked[n], 2) for w in ways} for n in checkpoints if asked[n]}
            print(f"write {write + 1}/{length}, {time.perf_counter() - start:.0f} s: {so_far}", flush=True)
    ranked = " | fact's write ranked first" if focusing else ""
    table = [f"| writes after | questions | {' | '.join(ways)}{ranked} |", f"|---|---|{'---|' * (len(ways) + bool(ranked))}"]
    table += [f"| {n} | {asked[n]} | " + " | ".join(f"{hits[n][w] / asked[n]:.2f}" for w in ways)
              + (f" | {ranked_first[n] / asked[n]:.2f}" if focusing else "") + " |" for n in checkpoints]  # fmt: skip
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records,
                                        "table": table}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
