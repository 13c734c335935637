"""`latentmem demo`: write facts into memory, bury them under distractors, ask, save and reload.

Runs on the embedded default model (the trained `tiny` preset, a few MB, offline, seconds on a
CPU). The facts are about invented people (a correct answer can only come from memory) and are
phrased with held-out templates the model never saw in training; the distractors are English
prose. With the untrained fallback model the same tour shows the mechanics only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .chat import generate_reply
from .data.filler import FillerStream, filler_paragraphs
from .data.synthetic import FactGenerator, question_prompt
from .modeling import MemoryLLM
from .models import default_model, is_untrained
from .state import MemoryState

ASK_AFTER = (5, 20)  # distractor counts after which the questions are asked again


def run_demo(model: MemoryLLM | None = None, tokenizer=None, distractors: int = 40, echo=print) -> MemoryState:
    """Run the tour on `model` and its tokenizer (default: `latentmem.models.default_model()`)."""
    if model is None:
        model, tokenizer = default_model()
    trained = not is_untrained(model)
    document = FactGenerator(seed=2024, split="heldout", facts_per_document=(2, 2)).document()
    filler = FillerStream(filler_paragraphs(source="stdlib"), seed=1)
    K, N = model.config.num_tokens, model.config.memory_size
    memory = model.new_memory(seed=0)

    def write(text: str, source: str):
        return model.inject(memory, text=text, tokenizer=tokenizer, source=source, allow_short=True)

    def ask(when: str) -> None:
        echo(f"{when}:")
        for qa in document.qa:
            ids = tokenizer(question_prompt(qa.question, tokenizer), add_special_tokens=False).input_ids
            reply = generate_reply(model, tokenizer, memory, ids, max_new_tokens=10).text.strip()
            verdict = ("right" if qa.answer.strip() in reply else "wrong") if trained else "random weights"
            echo(f"  {qa.question:<48} -> {reply!r:<22} ({verdict})")

    # The first write into an empty pool fills all of it (tiling); start from a filled pool so the
    # facts are an ordinary write of K slots.
    write(filler.passage(20, 45), source="warm-up")
    result = write(document.text, source="facts")
    echo(f"model: {model.config.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    own = memory.surviving_slots().get(result.injection_id, 0) / memory.num_layers  # slots that saw the facts
    rerun = f"; {result.slots_written - own:.0f} re-run the pool's newest slots" if own < result.slots_written else ""
    echo(f"wrote the facts {document.text!r}: {result.tokens} tokens -> {result.slots_written} new slots in each of "
         f"{memory.num_layers} layers ({own:.0f} hold the facts{rerun}; pool: {N} slots/layer, {K} per write)")  # fmt: skip
    echo(f"a slot survives t later writes with probability (1 - {K}/{N})^t; half-life ~{0.69 * N / K:.0f} writes")
    ask("asked right after writing")
    for i in range(1, distractors + 1):
        write(filler.passage(20, 45), source=f"distractor-{i}")
        if i in (1, 5, 10, 20, 40) or i == distractors:
            left = memory.surviving_slots().get(result.injection_id, 0) / memory.num_layers
            echo(f"after {i:>3} distractors: {left:5.1f} of the facts' slots per layer remain "
                 f"(expected {own * (1 - K / N) ** i:5.1f})")  # fmt: skip
        if i in ASK_AFTER:
            ask(f"asked after {i} distractor passages")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        memory.save(path)
        loaded = MemoryState.load(path, model)
        same = torch.equal(loaded.stm, memory.stm)
        echo(f"saved and reloaded the memory ({path.stat().st_size / 1e6:.1f} MB): identical = {same}")
    return memory
