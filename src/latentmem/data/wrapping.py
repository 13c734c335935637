"""Fact documents inside the writes real use makes: a chat exchange or a stretch of prose.

A chat writes the exchanges that leave its window ("User: Hi! ... \\nAssistant: ..."), a document is
written 64 tokens at a time, so the fact a question needs is rarely a write of its own. Trained only
on bare fact documents, the shipped model read a greeting written alone ("My name is Orla and my cat
is called Biscuit ...") right, and the same greeting written with its reply as a chat does wrong
("What is the name of my cat?" -> "Billy"; docs/experiments.md). `WriteWrapper` puts a document
where such writes put it, within the model's write length.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Said before a fact in a chat turn.
OPENERS = (
    "", "", "Hi! ", "Hey, ", "Good morning! ", "Quick note: ", "So, ", "One more thing. ", "Oh, and ",
    "Hello again. ", "Thanks! Also, ", "Okay. ", "By the way, ", "Hi there. ", "Sorry, I forgot: ",
)
# Replies an assistant gives to a user telling it something (the fact is never repeated).
ACKNOWLEDGEMENTS = (
    "Got it, I'll remember that.", "Thanks for telling me!", "Noted.", "Okay, good to know.",
    "That's lovely to hear. How can I help you today?", "Understood. Is there anything else?",
    "Sure, I have made a note of it.", "Great, thanks for sharing that with me.",
    "I see. Let me know if you need anything.", "Nice! What would you like to talk about next?",
    "Thank you. I'm happy to help with whatever you need.", "All right, I'll keep that in mind.",
)
USER, ASSISTANT = "User", "Assistant"  # the role tags `chat.role_tagged` writes


class WriteWrapper:
    """Wraps fact documents as a chat exchange (half the time) or inside English prose.

    Args:
        count_tokens: text -> its token count; a wrapped write never exceeds `max_tokens` (the
            model's write length), and a document too long to wrap is returned as it is.
        passage: (min_words, max_words) -> English text, for prose around the document and for
            assistant replies that talk about something else.
    """

    def __init__(self, count_tokens: Callable[[str], int], passage: Callable[[int, int], str], max_tokens: int,
                 seed: int = 0):  # fmt: skip
        self.count_tokens = count_tokens
        self.passage = passage
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)

    def wrap(self, document: str) -> str:
        if self.count_tokens(document) + 8 > self.max_tokens:
            return document
        return self._chat(document) if self.rng.random() < 0.5 else self._prose(document)

    def _chat(self, document: str) -> str:
        told = f"{USER}: {self.rng.choice(OPENERS)}{document}"
        if self.rng.random() < 0.5:
            reply = self.rng.choice(ACKNOWLEDGEMENTS)
        else:  # the assistant goes on about something else, as a small model does
            reply = self.passage(8, 30)
        if self.rng.random() < 0.25:  # the exchange before the fact was written with it
            return self._fit([f"{USER}: {self.passage(4, 12)}", f"{ASSISTANT}: {reply}", told], keep=2)
        return self._fit([told, f"{ASSISTANT}: {reply}"], keep=0)

    def _prose(self, document: str) -> str:
        before = self.passage(5, 30) if self.rng.random() < 0.7 else ""
        after = self.passage(5, 30) if not before or self.rng.random() < 0.7 else ""
        parts = [p for p in (before, document, after) if p]
        return self._fit(parts, keep=parts.index(document), sep=" ")

    def _fit(self, parts: list[str], keep: int, sep: str = "\n") -> str:
        """`parts` joined, words cut from the ends of the others until the whole fits `max_tokens`
        (the part at `keep`, which holds the document, is never cut)."""
        parts = list(parts)
        while self.count_tokens(sep.join(parts)) > self.max_tokens:
            longest = max((i for i in range(len(parts)) if i != keep), key=lambda i: len(parts[i].split()))
            words = parts[longest].split()
            if len(words) <= 2:
                return parts[keep]
            parts[longest] = " ".join(words[: max(2, len(words) * 3 // 4)])
        return sep.join(parts)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
