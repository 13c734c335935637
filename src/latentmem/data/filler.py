"""Unrelated English text ("filler") for distractor writes, available offline without downloads.

Sources, in order of preference:
1. text files the caller names (`paths=`), e.g. a local book or corpus dump;
2. Debian text packages if installed (`fortunes`, `fortunes-min`): quotations and literature;
3. always available: the prose of Python's own standard-library docstrings (real English, about
   400 KB, identical for a given Python minor version), so tests and CI never depend on apt.

`filler_paragraphs(source="stdlib")` pins the third source: training presets use it, so a preset
trains on the same filler on every machine.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from functools import lru_cache
from pathlib import Path

SYSTEM_TEXT_FILES = (
    "/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes/literature",
    "/usr/share/games/fortunes/riddles",
)  # fmt: skip
# Standard-library modules whose docstrings are harvested, in this fixed order.
STDLIB_MODULES = (
    "argparse", "collections", "textwrap", "json", "email.message", "http.client", "urllib.request", "logging",
    "unittest", "pathlib", "subprocess", "threading", "asyncio", "datetime", "decimal", "fractions", "random",
    "statistics", "string", "re", "csv", "sqlite3", "zipfile", "tarfile", "shutil", "tempfile", "functools",
    "itertools", "heapq", "bisect", "calendar", "difflib", "inspect", "pickle", "shelve", "socket", "smtplib",
    "ftplib", "imaplib", "pdb", "doctest", "typing", "enum", "dataclasses", "abc", "contextlib", "io", "os",
    "queue", "sched", "selectors", "signal", "mailbox", "html.parser", "configparser", "getopt", "gettext",
    "locale", "optparse", "pprint", "reprlib", "timeit", "trace", "uuid", "weakref", "wave", "zlib", "gzip",
    "bz2", "lzma", "hashlib", "hmac", "secrets", "base64", "binascii", "codecs", "copy", "numbers", "operator",
    "platform", "plistlib", "pstats", "runpy", "stat", "struct", "sysconfig", "tokenize", "traceback",
    "tracemalloc", "warnings", "webbrowser", "xmlrpc.client", "ipaddress", "mimetypes", "netrc",
)  # fmt: skip
MIN_WORDS = 8


def _clean(paragraph: str) -> str | None:
    """One whitespace-normalised prose paragraph, or None for code, tables and fragments."""
    text = " ".join(paragraph.split())
    if len(text.split()) < MIN_WORDS or ">>>" in text or "::" in text:
        return None
    prose = sum(c.isalpha() or c in " ,.;:'!?-" for c in text) / len(text)
    return text if prose >= 0.93 else None


def paragraphs_from_text(text: str) -> list[str]:
    """Prose paragraphs of a plain-text file (blank lines or fortune `%` lines separate them)."""
    chunks = re.split(r"\n\s*\n|\n%\n", text)
    return [p for p in map(_clean, chunks) if p]


@lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the standard library's module, class and function docstrings."""
    found: list[str] = []
    with warnings.catch_warnings():  # some attributes (typing.re, ...) warn when touched
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            found += _module_paragraphs(name)
    return tuple(dict.fromkeys(found))  # drop duplicates, keep order


def _module_paragraphs(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except ImportError:  # a module missing from this build (e.g. no _sqlite3): skip it
        return []
    objects = [module]
    for key, value in vars(module).items():
        if not key.startswith("_") and getattr(value, "__module__", None) == module.__name__:
            if inspect.isclass(value) or inspect.isfunction(value):
                objects.append(value)
            if inspect.isclass(value):
                objects += [v for k, v in vars(value).items() if not k.startswith("_") and inspect.isfunction(v)]
    return [p for obj in objects for p in paragraphs_from_text(inspect.getdoc(obj) or "")]


def filler_paragraphs(paths: list[str | Path] | None = None, source: str = "auto") -> list[str]:
    """English prose paragraphs for distractors.

    Args:
        paths: text files to read (used alone when given).
        source: "auto" (system text packages if installed, plus the stdlib docstrings) or
            "stdlib" (docstrings only: identical on every machine with the same Python).
    """
    if paths:
        found = [p for path in paths for p in paragraphs_from_text(Path(path).read_text(errors="replace"))]
        if not found:
            raise ValueError(f"no prose paragraphs of >= {MIN_WORDS} words in {[str(p) for p in paths]}")
        return found
    if source not in ("auto", "stdlib"):
        raise ValueError(f"source must be 'auto' or 'stdlib', got {source!r}")
    found = []
    if source == "auto":
        for file in SYSTEM_TEXT_FILES:
            if Path(file).is_file():
                found += paragraphs_from_text(Path(file).read_text(errors="replace"))
    return found + list(stdlib_paragraphs())


class FillerStream:
    """Draws filler passages of roughly a given word count from a list of paragraphs, reproducibly."""

    def __init__(self, paragraphs: list[str], seed: int = 0):
        if not paragraphs:
            raise ValueError("FillerStream needs at least one paragraph")
        self.paragraphs = paragraphs
        self.rng = random.Random(seed)

    def passage(self, min_words: int, max_words: int) -> str:
        """Consecutive paragraphs from a random start, cut to a random length in [min_words, max_words]."""
        target = self.rng.randint(min_words, max_words)
        i = self.rng.randrange(len(self.paragraphs))
        words: list[str] = []
        while len(words) < target:
            words += self.paragraphs[i % len(self.paragraphs)].split()
            i += 1
        return " ".join(words[:target])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
