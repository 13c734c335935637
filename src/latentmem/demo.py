"""`latentmem demo`: a person's notes go into memory; questions about them are asked right away,
after unrelated writes, and after the memory is saved and loaded again.

On the default model (`smollm2-135m-mplus`, SmolLM2-135M-Instruct with a memory adapter; a couple
of minutes on 2 CPU cores) `notes_tour` writes four everyday notes (a cat's name, where a spare key
is, a wifi password, an appointment) in one write, asks four questions in the model's chat template
(the prompt is the question alone: the answer can only come from memory), writes a few diary
entries as distractors, asks again, saves and reloads the memory and asks once more, and prints
how many answers were right at each point: counted from the replies, nothing fixed in advance.

Models that do not speak English (the 1M-parameter `tiny` preset, untrained test models) get
`tiny_tour`: two synthetic facts about an invented person, the facts' surviving slots counted
against the (1 - K/N)^t decay law over many distractors, and a faithful reload.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import default_stops, generate_reply, prompt_ids
from .data.filler import FillerStream, filler_paragraphs
from .data.synthetic import QA_CHAT_TEMPLATE, FactGenerator, question_prompt
from .modeling import MemoryLLM
from .models import BYTE_CHAT_TEMPLATE, default_model, is_untrained
from .state import MemoryState


@dataclass(frozen=True)
class Note:
    question: str
    answer: str  # a reply is right when it contains this (any case)


NOTES_TEXT = (
    "My notes, Saturday. My cat is called Pickle. The spare house key is under the blue flowerpot by "
    "the back door. The wifi password is 7431. My dentist appointment is on Thursday at 3 pm."
)
NOTES = (
    Note("What is my cat called?", "Pickle"),
    Note("Where is the spare house key?", "flowerpot"),
    Note("What is the wifi password?", "7431"),
    Note("On which day is my dentist appointment?", "Thursday"),
)
# Diary entries written after the notes: English text that answers none of the questions.
DIARY = (
    ("Went for a long walk along the river this morning. The water was high after all the rain and "
     "the path by the old mill was muddy, so I turned back at the bridge and had coffee in town."),
    ("Finished the novel my sister lent me. The ending was quieter than I expected, but the chapter "
     "about the lighthouse keeper will stay with me for a while. I should give it back on Sunday."),
    ("Work was slow today. Most of the afternoon went into a meeting about next year's budget, and "
     "nobody could agree on whether the new printers are worth the money."),
    ("Tried a new recipe for dinner: roasted vegetables with lemon and garlic, and a loaf of bread "
     "that came out flatter than the picture. Still tasted good. Must buy more flour."),
    ("The neighbours had a party until late, so I slept badly. In the morning the street was "
     "covered in leaves and someone had left a bicycle leaning against our fence."),
)
TOUR_DISTRACTORS = 5  # the notes tour's default; the tiny tour's is TINY_DISTRACTORS
TINY_DISTRACTORS = 40


def run_demo(
    model: MemoryLLM | None = None, tokenizer=None, distractors: int | None = None, echo=print
) -> MemoryState:
    """Run the tour that suits `model` (default: `latentmem.models.default_model()`); returns the memory."""
    if model is None:
        model, tokenizer = default_model()
    if speaks_english(tokenizer):
        return notes_tour(model, tokenizer, TOUR_DISTRACTORS if distractors is None else distractors, echo)
    return tiny_tour(model, tokenizer, TINY_DISTRACTORS if distractors is None else distractors, echo)


def speaks_english(tokenizer) -> bool:
    """False for the tiny preset (its "Question: ... Answer:" template) and untrained byte-level models."""
    return getattr(tokenizer, "chat_template", None) not in (QA_CHAT_TEMPLATE, BYTE_CHAT_TEMPLATE)


def notes_tour(model: MemoryLLM, tokenizer, distractors: int = TOUR_DISTRACTORS, echo=print) -> MemoryState:
    """Write `NOTES_TEXT`, ask `NOTES` now, after `distractors` diary writes, and after save + reload."""
    K, N = model.config.num_tokens, model.config.memory_size
    retrieved = getattr(model.config, "retrieved_slots", 0)  # M+ only
    stops = default_stops(tokenizer)
    filler = FillerStream(filler_paragraphs(source="stdlib"), seed=1)  # more distractors than DIARY entries
    memory = model.new_memory(seed=0)
    L = memory.num_layers
    mplus = f"; M+: slots that leave the pool go to a long-term store, {retrieved} come back per prompt" if retrieved else ""
    echo(f"model: {model.config.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
         f"memory: {N} slots in each of {L} layers, {K} new ones per write{mplus}")  # fmt: skip

    def write(text: str, source: str) -> float:
        start = time.perf_counter()
        model.inject(memory, text=text, tokenizer=tokenizer, source=source, allow_short=True)
        return time.perf_counter() - start

    def ask(state: MemoryState, when: str) -> int:
        echo(f"{when} (the prompt is the question alone):")
        right = 0
        for note in NOTES:
            start = time.perf_counter()
            ids = prompt_ids(tokenizer, [{"role": "user", "content": note.question}])
            reply = generate_reply(model, tokenizer, state, ids, max_new_tokens=16, stop=stops).text.strip()
            ok = note.answer.lower() in reply.lower()
            right += ok
            verdict = "right" if ok else f"wrong, expected {note.answer!r}"
            echo(f"  {note.question:<40} -> {reply!r} ({verdict}; {time.perf_counter() - start:.1f} s)")
        echo(f"  {right}/{len(NOTES)} right")
        return right

    echo(f"writing the notes into an empty memory: {NOTES_TEXT!r}")
    seconds = write(NOTES_TEXT, "notes")
    echo(f"  written in {seconds:.1f} s (an empty memory's first write fills its whole pool with copies of it)")
    scores = {"right after writing": ask(memory, "asked right after writing")}
    echo(f"writing {distractors} diary entries (unrelated English text) after the notes:")
    for i in range(1, distractors + 1):
        text = DIARY[i - 1] if i <= len(DIARY) else filler.passage(20, 45)
        seconds = write(text, f"diary-{i}")
        echo(f"  {i}/{distractors} ({seconds:.1f} s): {text[:60]}...")
    left = memory.surviving_slots().get(next(iter(memory.injections_from("notes"))), 0) / L
    echo(f"  {left:.0f} of the notes' {N} slots per layer are still in the pool")
    scores[f"after {distractors} distractor writes"] = ask(memory, f"asked after {distractors} distractor writes")
    with reloaded(model, memory, echo) as loaded:
        scores["after saving and reloading"] = ask(loaded, "asked the reloaded memory")
    echo("remembered: " + ", ".join(f"{n}/{len(NOTES)} {when}" for when, n in scores.items()))
    return memory


ASK_AFTER = (5, 20)  # distractor counts after which the questions are asked again


def tiny_tour(model: MemoryLLM, tokenizer, distractors: int = 40, echo=print) -> MemoryState:
    """The mechanics on a tiny model: synthetic facts, surviving slots against the decay law, reload."""
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
    with reloaded(model, memory, echo):
        pass
    return memory


@contextmanager
def reloaded(model, memory: MemoryState, echo) -> Iterator[MemoryState]:
    """`memory` saved to a temporary file and loaded again (alive inside the block: an M+ state
    maps its long-term store from the file's folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        memory.save(path)
        loaded = MemoryState.load(path, model)
        same = torch.equal(loaded.stm, memory.stm)
        echo(f"saved the memory to a file ({path.stat().st_size / 1e6:.1f} MB) and loaded it again: identical = {same}")
        yield loaded
