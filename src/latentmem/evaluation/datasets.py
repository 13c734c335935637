"""Samples for the retention protocol: synthetic facts, a NoLiMa-style variant, local QA files.

Real datasets use the other samples' contexts as distractors (as the MemoryLLM evaluation does);
synthetic ones use English filler passages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..data.filler import FillerStream, filler_paragraphs
from ..data.notes import NoteGenerator
from ..data.synthetic import FactGenerator
from .protocol import Sample


def synthetic_samples(
    n_samples: int,
    n_distractors: int,
    seed: int = 10_000,
    split: str = "heldout",
    filler: list[str] | None = None,
    filler_words: tuple[int, int] = (20, 45),
    generator: type = FactGenerator,
) -> list[Sample]:
    """Fact documents (held-out templates by default); one question per document. `generator`:
    `FactGenerator` (invented people's biographies) or `NoteGenerator` (everyday notes and chat lines)."""
    facts = generator(seed, split)
    stream = FillerStream(filler or filler_paragraphs(source="stdlib"), seed + 1)
    rng = random.Random(seed)
    samples = []
    for i in range(n_samples):
        document = facts.document()
        qa = rng.choice(document.qa)
        distractors = tuple(stream.passage(*filler_words) for _ in range(n_distractors))
        samples.append(Sample(document.text, qa.question, (qa.answer.strip(),), distractors, f"synthetic-{i}"))
    return samples


# Landmark -> city: the fact names the landmark, the question the city (latent association, NoLiMa).
LANDMARKS = (
    ("Semper Opera House", "Dresden"), ("Eiffel Tower", "Paris"), ("Colosseum", "Rome"),
    ("Brandenburg Gate", "Berlin"), ("Sagrada Familia", "Barcelona"), ("Big Ben", "London"),
    ("Acropolis", "Athens"), ("Golden Gate Bridge", "San Francisco"), ("Kremlin", "Moscow"),
    ("Sydney Opera House", "Sydney"), ("Space Needle", "Seattle"), ("Charles Bridge", "Prague"),
    ("Little Mermaid statue", "Copenhagen"), ("Atomium", "Brussels"), ("Rijksmuseum", "Amsterdam"),
)  # fmt: skip
NOLIMA_FACT = "Actually, {name} lives next to the {landmark}."
NOLIMA_QUESTION = "Which character has been to {city}?"


def nolima_samples(
    n_samples: int, n_distractors: int, seed: int = 20_000, filler: list[str] | None = None,
    filler_words: tuple[int, int] = (20, 45),
) -> list[Sample]:  # fmt: skip
    """The question shares no content word with the fact: answering needs landmark -> city knowledge."""
    facts = FactGenerator(seed, "heldout")
    stream = FillerStream(filler or filler_paragraphs(source="stdlib"), seed + 1)
    rng = random.Random(seed)
    samples = []
    for i in range(n_samples):
        name = facts.person()
        landmark, city = rng.choice(LANDMARKS)
        question = NOLIMA_QUESTION.format(city=city)
        distractors = tuple(stream.passage(*filler_words) for _ in range(n_distractors))
        samples.append(Sample(NOLIMA_FACT.format(name=name, landmark=landmark), question, (name,), distractors, f"nolima-{i}"))
    return samples


# --- local QA files -------------------------------------------------------------------------
def _records(path: Path) -> Iterator[dict]:
    """JSON (an object, a list, or SQuAD's {"data": [...]}) or JSONL, one record dict at a time."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("data", [data])
    for item in data:
        if "paragraphs" in item:  # SQuAD: article -> paragraphs -> qas
            for paragraph in item["paragraphs"]:
                for qa in paragraph.get("qas", []):
                    yield {"context": paragraph["context"], **qa}
        else:
            yield item


def _answers(record: dict) -> tuple[str, ...]:
    raw = next((record[k] for k in ("answers", "answer", "short_answers", "output") if k in record), [])
    if isinstance(raw, dict):  # HF SQuAD: {"text": [...], "answer_start": [...]}
        raw = raw.get("text", [])
    if isinstance(raw, str):
        raw = [raw]
    texts = [a.get("text", "") if isinstance(a, dict) else str(a) for a in raw]
    return tuple(t.strip() for t in texts if t and t.strip())


def _text(record: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, dict):
            value = value.get("text") or value.get("html")
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        if value:
            return str(value).strip()
    return ""


def load_qa_file(path: str | Path, limit: int | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
    """(context, question, answers) from SQuAD v1/v2, NaturalQuestions-style or LongBench files.

    Unanswerable questions (SQuAD v2 `is_impossible`, or no answers) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no QA file at {path}")
    out = []
    for record in _records(path):
        context = _text(record, ("context", "document_text", "long_answer", "document", "passage"))
        question = _text(record, ("question", "question_text", "input", "query"))
        answers = _answers(record)
        if record.get("is_impossible") or not (context and question and answers):
            continue
        out.append((context, question, answers))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no answerable (context, question, answers) records")
    return out


def file_samples(
    path: str | Path, n_samples: int, n_distractors: int, seed: int = 0, filler: list[str] | None = None
) -> list[Sample]:
    """Samples from a local QA file; distractors are other records' contexts (filler if too few)."""
    rows = load_qa_file(path)
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), min(n_samples, len(rows)))
    contexts = list(dict.fromkeys(r[0] for r in rows))
    stream = None
    samples = []
    for i in picked:
        context, question, answers = rows[i]
        others = [c for c in contexts if c != context]
        rng.shuffle(others)
        distractors = others[:n_distractors]
        if len(distractors) < n_distractors:
            stream = stream or FillerStream(filler or filler_paragraphs(source="stdlib"), seed + 1)
            distractors += [stream.passage(60, 120) for _ in range(n_distractors - len(distractors))]
        samples.append(Sample(context, question, answers, tuple(distractors), f"{Path(path).stem}-{i}"))
    return samples


def build_samples(dataset: str, n_samples: int, n_distractors: int, seed: int = 0) -> list[Sample]:
    """`synthetic`, `notes`, `nolima`, or a path to a SQuAD / NaturalQuestions JSON or LongBench JSONL file."""
    if dataset == "synthetic":
        return synthetic_samples(n_samples, n_distractors, seed=10_000 + seed)
    if dataset == "notes":
        return synthetic_samples(n_samples, n_distractors, seed=30_000 + seed, generator=NoteGenerator)
    if dataset == "nolima":
        return nolima_samples(n_samples, n_distractors, seed=20_000 + seed)
    return file_samples(dataset, n_samples, n_distractors, seed=seed)
