"""Cutting text into writes at line and sentence ends (`segments.py`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from latentmem.segments import even_split, join_short, sentences, text_chunks


def words(text: str) -> list[int]:
    """A tokenizer with one token per word (the word's length), enough to count with."""
    return [len(word) for word in text.split()]


def as_words(chunks: list[list[int]], text: str) -> list[str]:
    """The words of each chunk, read back from `text` by position."""
    all_words, out, at = text.split(), [], 0
    for chunk in chunks:
        out.append(" ".join(all_words[at : at + len(chunk)]))
        at += len(chunk)
    assert at == len(all_words)  # nothing lost, nothing repeated
    return out


def test_sentences_cut_after_sentence_and_line_ends_and_join_back():
    text = "Hi! My name is Orla. I keep the key in the teapot.\nAssistant: Noted. Anything else?"
    pieces = sentences(text)
    assert "".join(piece for piece, _ in pieces) == text
    assert [piece.strip() for piece, _ in pieces] == [
        "Hi!", "My name is Orla.", "I keep the key in the teapot.", "Assistant: Noted.", "Anything else?",
    ]  # fmt: skip
    assert [ends for _, ends in pieces] == [False, False, True, False, False]


def test_a_turn_that_fits_is_a_write_of_its_own_rather_than_shared_with_the_next():
    user = "User: Hi! My name is Orla and my cat is called Biscuit."  # 11 words
    assistant = "Assistant: " + " ".join(["Hello there, dear Orla, nice cat."] * 3)  # 16 words
    chunks = as_words(text_chunks(words, f"{user}\n{assistant}", max_tokens=20, min_tokens=4), f"{user}\n{assistant}")
    assert chunks[0] == user  # an even split would have put 13-14 words in each write
    assert all(len(chunk.split()) <= 20 for chunk in chunks)


def test_short_lines_pack_together_and_a_long_sentence_is_cut_evenly():
    text = "a b.\nc d.\ne f.\n" + " ".join(["w"] * 25) + "."
    chunks = text_chunks(words, text, max_tokens=10, min_tokens=2)
    assert [len(chunk) for chunk in chunks] == [6, 9, 8, 8]  # three lines, then 25 words in 3 pieces


def test_a_short_last_write_is_joined_to_the_one_before_or_shares_its_tokens():
    assert join_short([[1] * 8, [1] * 2], max_tokens=12, min_tokens=4) == [[1] * 10]
    assert [len(c) for c in join_short([[1] * 12, [1] * 2], max_tokens=12, min_tokens=4)] == [7, 7]
    assert [len(c) for c in join_short([[1] * 2, [1] * 5, [1] * 12], max_tokens=12, min_tokens=4)] == [7, 12]


@given(
    st.lists(st.tuples(st.integers(1, 30), st.sampled_from([". ", "! ", "\n", " "])), min_size=1, max_size=30),
    st.integers(8, 40),
)
def test_every_word_is_written_once_in_order_within_the_bounds(pieces, max_tokens):
    text = "".join(" ".join(["w"] * count) + end for count, end in pieces)
    min_tokens = max_tokens // 2
    chunks = text_chunks(words, text, max_tokens, min_tokens)
    as_words(chunks, text)  # order and completeness
    assert all(len(chunk) <= max_tokens for chunk in chunks)
    if len(text.split()) >= min_tokens:
        assert all(len(chunk) >= min_tokens for chunk in chunks)


def test_even_split_is_the_fewest_near_equal_pieces():
    assert [len(p) for p in even_split(list(range(25)), 10)] == [9, 8, 8]
