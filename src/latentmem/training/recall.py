"""Recall of freshly written facts, measured through the public API only (the retention protocol, in small).

For each held-out fact document: a new memory, `inject` the document, then `inject` filler
distractors one by one; after 0, 5, ... distractors ask each of the document's questions with
greedy `generate` and score an exact hit when the answer string appears in the continuation.
The chance level is the same measurement with the memory of a *different* document (same
distractors): what the model answers when memory holds no information about the question.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..data.filler import FillerStream
from ..data.synthetic import FactGenerator, question_prompt


@torch.no_grad()
def answer(model, tokenizer, memory, prompt: str, max_new_tokens: int = 12) -> str:
    """The greedy continuation of `prompt` read from `memory`."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(
        **inputs, memory=memory, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def recall_accuracy(
    model,
    tokenizer,
    num_documents: int = 40,
    distractors: tuple[int, ...] = (0, 5),
    split: str = "heldout",
    seed: int = 10_000,
    filler: list[str] | None = None,
    filler_words: tuple[int, int] = (20, 45),
    facts_per_document: tuple[int, int] = (1, 3),
) -> dict[str, float]:
    """Exact-hit rate after each number of distractors, and the chance level ("chance@n").

    Returns keys `exact@{n}` and `chance@{n}` for each n in `distractors`, plus `questions`.
    """
    from ..data.filler import filler_paragraphs

    was_training = model.training
    model.eval()
    facts = FactGenerator(seed, split, facts_per_document)
    documents = [facts.document() for _ in range(num_documents)]
    stream = FillerStream(filler or filler_paragraphs(source="stdlib"), seed + 1)
    hits: dict[str, list[bool]] = defaultdict(list)
    for i, document in enumerate(documents):
        other = documents[(i + 1) % len(documents)]  # its memory knows nothing about `document`
        memories = {"exact": model.new_memory(seed + i), "chance": model.new_memory(seed + i)}
        model.inject(memories["exact"], text=document.text, tokenizer=tokenizer, allow_short=True)
        model.inject(memories["chance"], text=other.text, tokenizer=tokenizer, allow_short=True)
        written = 0
        for n in sorted(distractors):
            for _ in range(n - written):
                passage = stream.passage(*filler_words)
                for memory in memories.values():
                    model.inject(memory, text=passage, tokenizer=tokenizer, allow_short=True)
            written = n
            for qa in document.qa:
                prompt = question_prompt(qa.question, tokenizer)
                for kind, memory in memories.items():
                    hits[f"{kind}@{n}"].append(qa.answer.strip() in answer(model, tokenizer, memory, prompt))
    model.train(was_training)
    result = {key: sum(v) / len(v) for key, v in hits.items()}
    result["questions"] = len(hits[f"exact@{distractors[0]}"])
    return result
