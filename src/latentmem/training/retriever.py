"""Training M+ (docs/design.md, Training objective): the retriever finds the long-term slots that answer a question, and
(co-training) the language model learns to answer from them.

Start from a MemoryLLM already trained to read its memory (e.g. the `tiny` preset), turned into an
M+ by `mplus_from`. By default only the per-layer retrievers learn; with `train_lm=True` the
language model learns too, reading the answer's long-term slots (`answer_first_retrieval`). Training
data is a long stream, as in real use: one memory takes a fact document and a few filler passages
per step, so older documents' slots are evicted into long-term memory. Each step then asks a
question about a document whose slots are in long-term memory and applies M+'s balanced
binary cross-entropy in every layer: that document's long-term slots are the positives, all other
long-term slots the negatives. Queries come from the question's hidden states entering each layer
(read with short-term memory, detached); keys are recomputed from the stored slots, so the
gradient reaches both `query_proj` and `key_proj`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.filler import FillerStream, filler_paragraphs
from ..data.synthetic import FactGenerator
from ..ltm.recall import collect_writes, first_layer_ranking, token_ranking, top_writes
from ..ltm.retriever import retrieval_scores, retriever_loss, write_ranking_loss
from ..modeling import MemoryLLM
from ..mplus import MPlus

# Loading lives with the models (inference never imports training); re-exported for older imports.
from ..presets.retrievers import (  # noqa: F401
    OPTIONAL_RETRIEVER_FIELDS,
    RETRIEVER_FIELDS,
    RETRIEVER_FILE,
    UNUSED_RETRIEVER_PART,
    load_retrievers,
    mplus_from,
    mplus_with_retrievers,
    retriever_config,
)
from ..state import MemoryState
from .tasks import qa_ids


def save_retrievers(model: MPlus, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save only `model`'s retrievers (bfloat16 by default), with the M+ fields that shape them.

    What ships for an M+ on a pretrained base: the base and its memory adapter come from elsewhere,
    and `mplus_with_retrievers` turns them back into this M+. `encoder_query_proj` is left out:
    latentmem never uses it (it exists to load the release's checkpoints), so it never trains and
    would be a third of the file.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in model.retrievers.state_dict().items()
               if UNUSED_RETRIEVER_PART not in name}  # fmt: skip
    fields = (*RETRIEVER_FIELDS, *OPTIONAL_RETRIEVER_FIELDS)
    save_file(tensors, folder / RETRIEVER_FILE, metadata={k: str(getattr(model.config, k)) for k in fields})
    return folder / RETRIEVER_FILE


@dataclass
class RetrieverStep:
    loss: float  # retriever loss (+ the answer's LM loss when the language model trains too)
    recall: float  # share of the answering document's long-term slots that the top R retrieves
    ltm_slots: int  # long-term slots per layer the question was scored against


@dataclass
class Question:
    """A question asked during a stream, the memory it is read from, and what answers it."""

    memory: MemoryState
    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor  # the answer and end-of-text
    injection_id: int  # the injection holding the answer
    in_ltm: bool  # whether some of its slots are in long-term memory


def question_queries(model: MPlus, memory: MemoryState, prompt_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the retrieval queries `[n, h]` of a prompt (hidden states read with short-term memory)."""
    with torch.no_grad():
        out = MemoryLLM.forward(model, prompt_ids[None], memory=memory, output_hidden_states=True, use_cache=False)
    return [
        model.retrieval_queries(i, layer.input_layernorm(out.hidden_states[i][0]))
        for i, layer in enumerate(model.decoder.layers)
    ]


OBJECTIVES = ("slots", "writes", "both")


def retriever_step_loss(model: MPlus, memory: MemoryState, prompt_ids: torch.Tensor, injection_id: int,
                        negatives: int | None = None, generator: torch.Generator | None = None,
                        objective: str = "slots", temperature: float = 0.05):  # fmt: skip
    """Mean over layers of the retriever loss for a prompt answered by injection `injection_id`.

    `objective`: "slots" (the release: balanced binary cross-entropy of every long-term slot),
    "writes" (`write_ranking_loss`: the answering write must outrank every other write, each scoring
    as its best slot, which is how `retrieval_unit="write"` reads) or "both" (their sum).

    `negatives`: per layer, score the answer's slots against at most this many other long-term
    slots (None: all of them). The sample is drawn at random, plus (for the write objective) every
    long-term slot of the writes the current retriever ranks highest: the hard negatives a real
    read must beat. The balanced loss averages each class on its own, so a uniform sample of
    negatives estimates the same loss while reading a bounded number of slots instead of the whole
    store (whose size grows with the stream). Recall is then measured as a read retrieves: the
    store's search over its stored keys.

    Returns (loss, recall of the top R, long-term slots per layer), or None when no layer holds a
    long-term slot of that injection.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    queries = question_queries(model, memory, prompt_ids)
    losses, hits, positives, size = [], 0, 0, 0
    count = model.config.retrieved_slots
    for i, layer in enumerate(model.decoder.layers):
        sources = memory.ltm.sources(i)
        positive = sources == injection_id
        if not positive.any():  # decided before any slot is read
            continue
        rows = torch.arange(len(positive))
        sampled = negatives is not None and int((~positive).sum()) > negatives
        if sampled:
            others = (~positive).nonzero().flatten()
            drawn = others[torch.randperm(len(others), generator=generator)[:negatives]]
            rows = torch.cat([positive.nonzero().flatten(), drawn])
            if objective != "slots":  # hard negatives: whole writes the retriever now puts first
                with torch.no_grad():
                    rivals = top_writes(memory.ltm, i, queries[i].detach(), count, model.config.write_candidates)
                rows = torch.cat([rows, rivals])
            rows = rows.unique()  # sorted
        slots = memory.ltm.get(i, rows)["slots"].to(device=model.device, dtype=model.dtype)
        keys = model.retrieval_keys(i, layer.input_layernorm(slots))
        loss = 0.0
        if objective != "writes":
            loss = retriever_loss(queries[i], keys, positive[rows].to(model.device))
        if objective != "slots":
            loss = loss + write_ranking_loss(queries[i], keys, sources[rows], injection_id, temperature)
        losses.append(loss)
        with torch.no_grad():
            if sampled:
                top, _ = memory.ltm.search(i, queries[i], count)
            else:
                top = retrieval_scores(queries[i], keys).topk(min(count, len(keys))).indices.cpu()
        hits += int(positive[top].sum())
        positives += int(positive.sum())
        size = max(size, len(positive))
    if not losses:
        return None
    return torch.stack(losses).mean(), hits / positives, size


def question_stream(model: MPlus, tokenizer, *, split: str = "train", seed: int = 0, stream_length: int = 60,
                    distractors_per_step: int = 3, fresh_fraction: float = 0.0,
                    facts_per_document: tuple[int, int] = (1, 2),
                    filler_words: tuple[int, int] = (20, 45)) -> Iterator[Question | None]:  # fmt: skip
    """Endless steps of a fact stream: write a document and distractors, then yield a question.

    Each step writes a document, yields (with probability `fresh_fraction`) a question about it at
    once, writes `distractors_per_step` filler passages, then yields a question about a document
    with slots in long-term memory (None while there is none). Every `stream_length` steps the
    stream starts over with an empty memory (bounding the long-term store).
    """
    facts = FactGenerator(seed, split, facts_per_document)
    filler = FillerStream(filler_paragraphs(source="stdlib"), seed + 1)
    rng = random.Random(seed + 2)

    def ask(memory, injection_id, document, in_ltm) -> Question:
        prompt, answer = qa_ids(tokenizer, rng.choice(document.qa))
        return Question(memory, prompt.to(model.device), answer.to(model.device), injection_id, in_ltm)

    step = 0
    while True:
        if step % stream_length == 0:
            memory, history = model.new_memory(seed + step), []
        step += 1
        document = facts.document()
        written = model.inject(memory, text=document.text, tokenizer=tokenizer, allow_short=True, source="fact")
        history.append((written.injection_id, document))
        if fresh_fraction and rng.random() < fresh_fraction:
            yield ask(memory, written.injection_id, document, in_ltm=False)
        for _ in range(distractors_per_step):
            model.inject(memory, text=filler.passage(*filler_words), tokenizer=tokenizer, allow_short=True)
        in_ltm = set(memory.ltm.sources(0).tolist())
        candidates = [(i, d) for i, d in history if i in in_ltm]
        yield ask(memory, *rng.choice(candidates), in_ltm=True) if candidates else None


def answer_first_retrieval(injection_id: int, generator: torch.Generator):
    """A `retrieve_fn` that returns the answering injection's long-term slots, topped up with random others.

    Used while training the language model to read retrieved slots: it sees what a perfect
    retriever would bring (oldest first, as a read orders them) before the learned one is good.
    """

    def choose(model: MPlus, state: MemoryState, layer: int, normed: torch.Tensor, count: int):
        answering = state.ltm.sources(layer) == injection_id
        others = (~answering).nonzero().flatten()
        others = others[torch.randperm(len(others), generator=generator)]
        rows = state.ltm.get(layer, torch.cat([answering.nonzero().flatten(), others])[:count])  # only those read
        oldest_first = torch.argsort(rows["ages"], descending=True, stable=True)
        return rows["slots"][oldest_first], rows["sources"][oldest_first]

    return choose


def answer_loss(model: MPlus, question: Question, retrieve_fn=None) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, read from the question's memory (with `retrieve_fn`)."""
    ids = torch.cat([question.prompt_ids, question.answer_ids])[None]
    logits = model(ids, memory=question.memory, use_cache=False, retrieve_fn=retrieve_fn).logits
    start = question.prompt_ids.numel() - 1  # the logit that predicts the first answer token
    return F.cross_entropy(logits[0, start:-1].float(), question.answer_ids)


def train_retriever(
    model: MPlus,
    tokenizer,
    steps: int = 400,
    *,
    lr: float = 3e-3,
    train_lm: bool = False,
    lm_lr: float = 5e-4,
    batch_size: int = 1,
    fresh_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    log=None,
    max_seconds: float | None = None,
    negatives: int | None = None,
    objective: str = "slots",
    temperature: float = 0.05,
    **stream_options,
) -> list[RetrieverStep]:
    """Train `model.retrievers` in place on `batch_size` question streams; returns the per-step record.

    With `train_lm=True` the language model trains too (co-training, as in M+): every question's
    answer is also predicted reading `[bos ; retrieved ; STM]`, the retrieved slots chosen by
    `answer_first_retrieval`, so the model learns to answer from long-term slots; `fresh_fraction`
    of the questions are asked right after their document's write, so answering fresh memories
    keeps being practised. Otherwise everything but the retrievers is frozen.
    `log(record)` receives each step's numbers. `max_seconds` stops training early (a time budget).
    `negatives` bounds the slots each question's loss reads per layer; `objective` picks the loss
    (slots, writes or both) and `temperature` the write softmax's (see `retriever_step_loss`).
    """
    model.requires_grad_(train_lm)
    model.retrievers.requires_grad_(True)
    model.train(train_lm)
    groups = [{"params": list(model.retrievers.parameters()), "lr": lr}]
    if train_lm:
        retriever_ids = {id(p) for p in groups[0]["params"]}
        groups.append({"params": [p for p in model.parameters() if id(p) not in retriever_ids], "lr": lm_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    streams = [question_stream(model, tokenizer, split="train", seed=seed + 1000 * b,
                               fresh_fraction=fresh_fraction if train_lm else 0.0, **stream_options)
               for b in range(batch_size)]  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    records: list[RetrieverStep] = []
    bar = tqdm(range(steps), desc="M+ training" if train_lm else "retriever", disable=not progress, dynamic_ncols=True)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    for step in bar:
        if deadline is not None and time.monotonic() >= deadline:
            break
        losses, recalls, size = [], [], 0
        for question in (next(stream) for stream in streams):
            if question is None:
                continue
            loss = None
            if question.in_ltm:
                result = retriever_step_loss(model, question.memory, question.prompt_ids, question.injection_id,
                                             negatives, generator, objective, temperature)  # fmt: skip
                if result is not None:
                    loss, recall, size = result[0], result[1], max(size, result[2])
                    recalls.append(recall)
            if train_lm:
                lm_loss = answer_loss(model, question, answer_first_retrieval(question.injection_id, generator))
                loss = lm_loss if loss is None else loss + lm_loss
            if loss is not None:
                (loss / batch_size).backward()
                losses.append(loss.item())
        if not losses:
            continue
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = RetrieverStep(sum(losses) / len(losses), sum(recalls) / len(recalls) if recalls else float("nan"), size)
        records.append(record)
        recent = [r for r in records[-50:] if not math.isnan(r.recall)]
        bar.set_postfix(loss=f"{sum(r.loss for r in records[-50:]) / len(records[-50:]):.3f}",
                        recall=f"{sum(r.recall for r in recent) / max(1, len(recent)):.2f}")  # fmt: skip
        if log is not None:
            log({"step": step + 1, "loss": record.loss, "retrieval_recall": record.recall, "ltm_slots": size})
    model.requires_grad_(False)
    model.eval()
    return records


@torch.no_grad()
def evaluate_retriever(model: MPlus, tokenizer, questions: int = 40, seed: int = 10_000, **stream_options) -> dict:
    """Held-out retrieval quality: loss, recall of the top R and its chance level (R / long-term slots)."""
    stream = question_stream(model, tokenizer, split="heldout", seed=seed, **stream_options)
    losses, recalls, chance, writes = [], [], [], []
    while len(losses) < questions:
        question = next(stream)
        result = retriever_step_loss(model, question.memory, question.prompt_ids, question.injection_id) if question else None
        if result is not None:
            losses.append(result[0].item())
            recalls.append(result[1])
            chance.append(min(1.0, model.config.retrieved_slots / result[2]))
            writes.append(answering_write_found(model, question.memory, question.prompt_ids, question.injection_id))
    mean = lambda values: round(sum(values) / len(values), 4)
    return {"loss": mean(losses), "recall": mean(recalls), "chance": mean(chance), "write_found": mean(writes),
            "questions": questions}  # fmt: skip


@torch.no_grad()
def answering_write_found(model: MPlus, memory: MemoryState, prompt_ids: torch.Tensor, injection_id: int) -> float:
    """Share of layers (among those holding long-term slots of the answering write) whose retrieval of
    whole writes (as `retrieval_unit="write"` reads: `top_writes` per layer, or the writes ranked once
    at the first layer with `write_ranking="first_layer"` or `"tokens"`) brings that write back."""
    count = model.config.retrieved_slots
    if model.config.write_ranking != "per_layer":  # ranked once from the prompt's embeddings, no read
        if model.config.write_ranking == "tokens":
            ranked = token_ranking(model, memory, prompt_ids)
        else:
            ranked = first_layer_ranking(model, memory, model.decoder.layers[0].input_layernorm(
                model.embed(prompt_ids[None])[0]))  # fmt: skip
        chosen_per_layer = [collect_writes(memory.ltm, i, ranked, count, per_write=model.config.num_tokens)
                            for i in range(memory.num_layers)]  # fmt: skip
    else:
        queries = question_queries(model, memory, prompt_ids)
        chosen_per_layer = [top_writes(memory.ltm, i, queries[i].detach(), count, model.config.write_candidates)
                            for i in range(memory.num_layers)]  # fmt: skip
    found = []
    for i, chosen in enumerate(chosen_per_layer):
        sources = memory.ltm.sources(i)
        if (sources == injection_id).any():
            found.append(bool((sources[chosen] == injection_id).any()))
    return sum(found) / max(1, len(found))
