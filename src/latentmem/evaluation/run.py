"""`run_retention` and `run_stream`: the calls behind `latentmem eval retention` and `latentmem eval stream`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .datasets import build_samples
from .methods import LM, Embedder, Method, build_method
from .long_stream import DEFAULT_BUCKETS, run_long_stream
from .protocol import DEFAULT_CHECKPOINTS, RetentionResult, run_protocol
from .report import write_results

DEFAULT_METHODS = ("memory", "replay", "summary", "rag", "none")
DEFAULT_WARMUP = 10  # writes before the answer's context: a memory in use, as in real sessions
DEFAULT_ANSWER_TOKENS = 40  # chat models restate the question first; 12 tokens cut many answers off


def run_retention(
    model,
    tokenizer,
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    n_samples: int = 20,
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
    out_dir: str | Path | None = None,
    *,
    dataset: str = "synthetic",
    position: str = "first",
    seed: int = 0,
    warmup: int = DEFAULT_WARMUP,
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> RetentionResult:
    """Compare `methods` (names or Method objects) on the same samples; write results to `out_dir`
    after every method (a run stopped midway keeps what it measured).

    `dataset` is "synthetic", "nolima" or a local SQuAD / NaturalQuestions / LongBench file.
    `warmup`: distractors every method observes before the answer's context (see `run_protocol`):
    by default a memory already in use. `max_new_tokens`: long enough for chat models that restate
    the question before answering, so no method is cut off mid-answer.
    """
    lm = LM(model, tokenizer, max_new_tokens=max_new_tokens)
    built = _methods(methods, lm, embedder)
    samples = build_samples(dataset, n_samples, max(checkpoints) + warmup, seed=seed)
    context = {"dataset": dataset, "model": _model_name(model), "max_new_tokens": max_new_tokens}
    result = run_protocol(built, samples, checkpoints, position=position, seed=seed, warmup=warmup,
                          count_tokens=lm.count, progress=progress,
                          on_method_done=_saver(out_dir, context))  # fmt: skip
    result.config.update(context)
    return result


def run_stream(
    model,
    tokenizer,
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    n_facts: int = 20,
    length: int = 200,
    out_dir: str | Path | None = None,
    *,
    dataset: str = "synthetic",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    seed: int = 0,
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> RetentionResult:
    """Facts at random places in one stream of `length` writes, all asked at the end (`run_long_stream`)."""
    lm = LM(model, tokenizer, max_new_tokens=max_new_tokens)
    built = _methods(methods, lm, embedder)
    facts = build_samples(dataset, n_facts, -(-length // max(1, n_facts)), seed=seed)
    context = {"dataset": dataset, "model": _model_name(model), "max_new_tokens": max_new_tokens}
    result = run_long_stream(built, facts, length, seed=seed, buckets=buckets, count_tokens=lm.count,
                             on_method_done=_saver(out_dir, context, at=tuple(buckets)), progress=progress)  # fmt: skip
    result.config.update(context)
    return result


def _methods(methods: Sequence[str | Method], lm: LM, embedder: Embedder | None) -> list[Method]:
    """Methods built from their names, each reported under the name it was asked for."""
    built = []
    for m in methods:
        if isinstance(m, Method):
            built.append(m)
            continue
        method = build_method(m, lm, **({"embedder": embedder} if m == "rag" else {}))
        method.name = m  # e.g. two memories, "memory" and "memory@runs/x", stay apart
        built.append(method)
    names = [m.name for m in built]
    if len(set(names)) != len(names):
        raise ValueError(f"methods must have distinct names, got {names}")
    return built


def _model_name(model) -> str:
    return str(model.config.name_or_path or type(model).__name__)


def _saver(out_dir, context: dict, at: tuple[int, ...] | None = None):
    """A callback that writes the results so far into `out_dir` (None: keep nothing on disk)."""
    if out_dir is None:
        return None

    def save(result: RetentionResult) -> None:
        result.config.update(context)
        result.config["files"] = {k: str(p) for k, p in write_results(result, out_dir, at=at).items()}

    return save
