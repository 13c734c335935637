"""`run_retention`: the one call behind `latentmem eval retention`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .datasets import build_samples
from .methods import LM, Embedder, Method, build_method
from .protocol import DEFAULT_CHECKPOINTS, RetentionResult, run_protocol
from .report import write_results

DEFAULT_METHODS = ("memory", "replay", "summary", "rag", "none")


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
    warmup: int = 0,
    max_new_tokens: int = 12,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> RetentionResult:
    """Compare `methods` (names or Method objects) on the same samples; write results to `out_dir`.

    `dataset` is "synthetic", "nolima" or a local SQuAD / NaturalQuestions / LongBench file.
    `warmup`: distractors every method observes before the answer's context (see `run_protocol`).
    """
    lm = LM(model, tokenizer, max_new_tokens=max_new_tokens)
    built = [
        m if isinstance(m, Method) else build_method(m, lm, **({"embedder": embedder} if m == "rag" else {}))
        for m in methods
    ]
    samples = build_samples(dataset, n_samples, max(checkpoints) + warmup, seed=seed)
    result = run_protocol(built, samples, checkpoints, position=position, seed=seed, warmup=warmup,
                          count_tokens=lm.count, progress=progress)  # fmt: skip
    result.config.update(dataset=dataset, model=str(model.config.name_or_path or type(model).__name__))
    if out_dir is not None:
        result.config["files"] = {k: str(p) for k, p in write_results(result, out_dir).items()}
    return result
