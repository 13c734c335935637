"""Where a text is cut into writes: at line ends, else at sentence ends, inside a sentence only when
one sentence is longer than a write.

A focused read attends to the one write that ranks first, so a fact cut in two by a fixed-length
split is in neither half; and a chat turn written with part of the next one reads worse than alone
(the greeting "My name is Orla and my cat is called Biscuit ..." written alone: "What is my name?"
-> "Orla"; written with the first 15 tokens of the assistant's reply: "Beth";
docs/experiments.md). `text_chunks` keeps lines (a chat's turns, a note file's notes) and sentences
whole where it can, and still makes writes as long as the model's write length allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from .writing import split_into_chunks

# A sentence ends at . ! or ? (and closing quotes or brackets) before whitespace; a line at a newline.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+|\n\s*")

Encode = Callable[[str], list[int]]


def sentences(text: str) -> list[tuple[str, bool]]:
    """`text` cut after every sentence and line end, losslessly: ("piece", ends_a_line) pairs whose
    pieces join back to `text`."""
    edges = [0] + [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)] + [len(text)]
    pieces = [text[a:b] for a, b in zip(edges, edges[1:]) if b > a]
    return [(piece, "\n" in piece[len(piece.rstrip()) :]) for piece in pieces]


def text_chunks(encode: Encode, text: str, max_tokens: int, min_tokens: int = 1) -> list[list[int]]:
    """Token ids of `text` in writes of at most `max_tokens`: whole lines packed together while they
    fit, a longer line by whole sentences, a longer sentence cut evenly. A write shorter than
    `min_tokens` is joined to a neighbour (`join_short`).

    `encode(text) -> ids` is the tokenizer as writes use it (`chat.memory_ids`).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    raw, encode = encode, lambda part: raw(part.rstrip())  # a write does not end in the line break
    lines: list[str] = []
    line = ""
    for piece, ends_line in sentences(text):
        line += piece
        if ends_line:
            lines.append(line)
            line = ""
    if line:
        lines.append(line)

    def by_sentences(line: str) -> list[list[int]]:  # a line longer than a write
        return _pack([piece for piece, _ in sentences(line)], encode, max_tokens,
                     lambda sentence: even_split(encode(sentence), max_tokens))  # fmt: skip

    chunks = _pack(lines, encode, max_tokens, by_sentences)
    return join_short([chunk for chunk in chunks if chunk], max_tokens, min_tokens)


def _pack(parts: list[str], encode: Encode, max_tokens: int, too_long: Callable[[str], list[list[int]]]
          ) -> list[list[int]]:  # fmt: skip
    """`parts` joined in order into chunks of at most `max_tokens`, greedily; a part longer than that
    on its own becomes `too_long(part)`."""
    chunks, current = [], ""
    for part in parts:
        if current and len(encode(current + part)) <= max_tokens:
            current += part
            continue
        if current:
            chunks.append(encode(current))
        current = ""
        if len(encode(part)) <= max_tokens:
            current = part
        else:
            chunks += too_long(part)
    if current:
        chunks.append(encode(current))
    return chunks


def join_short(chunks: list[list[int]], max_tokens: int, min_tokens: int) -> list[list[int]]:
    """Each chunk shorter than `min_tokens` joined to its next (else its previous) neighbour, or cut
    evenly with it when the two exceed `max_tokens`: with `max_tokens >= 2 * min_tokens`, every
    chunk then reaches `min_tokens` unless the whole text is shorter."""
    chunks = list(chunks)
    i = 0
    while i < len(chunks):
        if len(chunks[i]) >= min_tokens or len(chunks) == 1:
            i += 1
            continue
        after = i + 1 < len(chunks) and len(chunks[i]) + len(chunks[i + 1]) <= max_tokens
        before = i > 0 and len(chunks[i - 1]) + len(chunks[i]) <= max_tokens
        if after:
            chunks[i : i + 2] = [chunks[i] + chunks[i + 1]]
        elif before:
            chunks[i - 1 : i + 1] = [chunks[i - 1] + chunks[i]]
        else:  # both neighbours too long to take it whole: share one's tokens evenly
            j = i if i + 1 < len(chunks) else i - 1
            chunks[j : j + 2] = even_split(chunks[j] + chunks[j + 1], max_tokens)
            i = j + 1
    return chunks


def even_split(ids: Sequence[int], max_tokens: int) -> list[list[int]]:
    """The fewest near-equal pieces of at most `max_tokens` (`writing.split_into_chunks`, on lists)."""
    return [piece.tolist() for piece in split_into_chunks(torch.tensor(list(ids), dtype=torch.long), max_tokens)]
