"""Plain-text and JSONL corpora from a local path, as documents (strings).

- `.txt` / `.md`: documents are separated by blank lines (one file is one document with
  `split_paragraphs=False`).
- `.jsonl` / `.json` lines: one JSON object per line; the document is its `text_field` (default
  "text"); with `qa=True`, objects with `context`/`question`/`answer` fields (SQuAD-like, answers
  may be a list) become (context, question, answer) triples via `load_qa`.
- a folder: every matching file under it, in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no corpus at {path}: expected a .txt/.jsonl file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path} holds no {TEXT_SUFFIXES + JSONL_SUFFIXES} files")
    return files


def _jsonl_records(file: Path) -> Iterator[tuple[int, dict]]:
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{file}:{number}: expected a JSON object, got {type(record).__name__}")  # noqa: TRY004
            yield number, record


def load_documents(path: str | Path, text_field: str = "text", split_paragraphs: bool = True) -> Iterator[str]:
    """Yield the documents of a corpus file or folder, in order, skipping empty ones."""
    for file in corpus_files(path):
        if file.suffix in JSONL_SUFFIXES:
            for number, record in _jsonl_records(file):
                if text_field not in record:
                    raise KeyError(f"{file}:{number}: no {text_field!r} field (pass text_field=...)")
                text = str(record[text_field]).strip()
                if text:
                    yield text
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            chunks = text.split("\n\n") if split_paragraphs else [text]
            for chunk in chunks:
                if chunk.strip():
                    yield chunk.strip()


def load_qa(
    path: str | Path, context="context", question="question", answer="answer"
) -> Iterator[tuple[str, str, str]]:
    """Yield (context, question, answer) triples from JSONL records (the first answer if a list)."""
    for file in corpus_files(path):
        if file.suffix not in JSONL_SUFFIXES:
            raise ValueError(f"{file}: question/answer data must be JSONL")
        for number, record in _jsonl_records(file):
            missing = [f for f in (context, question, answer) if f not in record]
            if missing:
                raise KeyError(f"{file}:{number}: missing fields {missing}")
            value = record[answer]
            if isinstance(value, list):
                if not value:
                    continue
                value = value[0]
            if isinstance(value, dict):  # SQuAD's {"text": ..., "answer_start": ...}
                value = value.get("text", "")
            yield str(record[context]), str(record[question]), str(value)
