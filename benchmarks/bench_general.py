"""General ability with memory: perplexity on held-out English text and answers to general
questions, read through a memory in use, against the base model reading no memory.

The memory adapters are trained to answer from memory; this measures what they cost the model
everywhere else. One memory takes `--writes` texts (fact documents and notes among English
passages, as a user's memory would), then:

1. perplexity of `--passages` held-out paragraphs (Python's language reference, `pydoc_data`, which
   no training or filler text draws on), each read as the prompt: by the base model (no memory) and
   by the memory model reading the memory in use;
2. `--questions` general-knowledge questions in the chat format, greedy answers of up to
   `--max-new-tokens` tokens, right when an accepted answer is contained: the base model against the
   memory model reading the same memory. Every answer is printed side by side.

Prints both with the ratio memory / base measured in the same run.

    python benchmarks/bench_general.py --model smollm2-135m-mplus --writes 30
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from latentmem.chat import generate_reply, prompt_ids
from latentmem.data.filler import FillerStream, filler_paragraphs, paragraphs_from_text
from latentmem.data.notes import NoteGenerator
from latentmem.data.synthetic import FactGenerator
from latentmem.models import load_model

# (question, accepted answers): common knowledge a 135M model often has, none about the memory.
QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What colour is the sky on a clear day?", ["blue"]),
    ("What is the largest planet in the solar system?", ["jupiter"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What do bees make?", ["honey"]),
    ("What is the boiling point of water in degrees Celsius?", ["100"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the chemical symbol for water?", ["h2o"]),
    ("What is the opposite of hot?", ["cold"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What is frozen water called?", ["ice"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is two plus two?", ["four", "4"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("What language is mostly spoken in Brazil?", ["portuguese"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What is the main ingredient of guacamole?", ["avocado"]),
    ("What do you call a baby cat?", ["kitten"]),
]


def held_out_paragraphs(count: int) -> list[str]:
    """English prose from Python's language reference (`pydoc_data.topics`), in a fixed order."""
    from pydoc_data.topics import topics

    found = [p for key in sorted(topics) for p in paragraphs_from_text(topics[key]) if len(p.split()) >= 30]
    if len(found) < count:
        raise SystemExit(f"only {len(found)} held-out paragraphs here, asked for {count}")
    return found[:: max(1, len(found) // count)][:count]


def fill_memory(model, tokenizer, writes: int, seed: int):
    """A memory in use: a fact document or note every third write, English passages between."""
    memory = model.new_memory(seed)
    generators = [FactGenerator(seed, "heldout", (1, 2)), NoteGenerator(seed + 1, "heldout")]
    filler = FillerStream(filler_paragraphs(source="stdlib"), seed + 2)
    for i in range(writes):
        text = generators[(i // 3) % 2].document().text if i % 3 == 1 else filler.passage(20, 45)
        model.inject(memory, text=text, tokenizer=tokenizer, allow_short=True)
    return memory


@torch.inference_mode()
def perplexity(model, tokenizer, memory, paragraphs: list[str], max_tokens: int) -> float:
    """exp(mean next-token loss) over every paragraph's tokens, each paragraph its own prompt."""
    total, count = 0.0, 0
    for text in paragraphs:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and ids[0, 0] != bos:
            ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
        logits = model(ids, memory=memory, use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


def answer(model, tokenizer, memory, question: str, max_new_tokens: int) -> str:
    ids = prompt_ids(tokenizer, [{"role": "user", "content": question}])
    return generate_reply(model, tokenizer, memory, ids, max_new_tokens=max_new_tokens).text.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-mplus")
    parser.add_argument("--writes", type=int, default=30, help="texts written before measuring (a memory in use)")
    parser.add_argument("--passages", type=int, default=40, help="held-out paragraphs for perplexity")
    parser.add_argument("--passage-tokens", type=int, default=96, help="tokens of each paragraph scored")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"general questions (at most {len(QUESTIONS)})")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--adapter", type=Path, help="read with this memory adapter's weights (a folder, as saved by training)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write every answer and the numbers here (json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if args.adapter:
        from latentmem.presets.adapter import load_memory_adapter

        load_memory_adapter(model, args.adapter)
    start = time.perf_counter()
    memory = fill_memory(model, tokenizer, args.writes, args.seed)
    print(f"{args.writes} writes in {time.perf_counter() - start:.0f} s", flush=True)

    paragraphs = held_out_paragraphs(args.passages)
    base_ppl = perplexity(model, tokenizer, None, paragraphs, args.passage_tokens)
    memory_ppl = perplexity(model, tokenizer, memory, paragraphs, args.passage_tokens)
    print(f"perplexity, {len(paragraphs)} held-out paragraphs: base {base_ppl:.2f}, with memory {memory_ppl:.2f} "
          f"({memory_ppl / base_ppl:.2f}x)", flush=True)  # fmt: skip

    rows, right = [], {"base": 0, "memory": 0}
    for question, accepted in QUESTIONS[: args.questions]:
        row = {"question": question}
        for name, read in (("base", None), ("memory", memory)):
            text = answer(model, tokenizer, read, question, args.max_new_tokens)
            row[name], row[f"{name}_right"] = text, any(a in text.lower() for a in accepted)
            right[name] += row[f"{name}_right"]
        rows.append(row)
        print(f"- {question}\n    base:   {row['base']!r}\n    memory: {row['memory']!r}", flush=True)
    asked = len(rows)
    print(f"general questions right: base {right['base']}/{asked}, with memory {right['memory']}/{asked} "
          f"({right['memory'] / max(right['base'], 1):.2f}x)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        numbers = {"perplexity": {"base": base_ppl, "memory": memory_ppl}, "right": right, "asked": asked}
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **numbers, "answers": rows}, indent=1))


if __name__ == "__main__":
    main()
