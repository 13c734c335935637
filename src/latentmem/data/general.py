"""Chat prompts that memory cannot answer: general requests, greetings, small talk.

Training reads of a write that does not answer the prompt (`FactTask.unrelated_episode`) use them:
the target is the base model's own reply without memory, so the read adapters learn to leave the
model as it was when memory has nothing to say. Trained only on questions that memory answers,
the SmolLM2 read adapter answered "What is the capital of France?" with a name from memory
("Lionford") and 22 of 24 general questions wrongly (docs/experiments.md).

Prompts are drawn from templates over word lists, reproducibly. None asks a general-knowledge
question of the kinds `benchmarks/bench_general.py` evaluates (capitals, planets, counting,
animals' traits, authors, ...), so that benchmark measures what training did not see.

    prompts = GeneralPrompts(seed=0)
    prompts.prompt()   # "Can you suggest a name for a bakery?"
"""

from __future__ import annotations

import random

from .notes import FIRST_NAMES

TOPICS = ("autumn", "the sea", "a rainy morning", "friendship", "coffee", "mountains", "a lost umbrella",
          "the night sky", "trains", "a quiet library", "gardening", "snow", "bicycles", "the city at dawn",
          "an old photograph", "summer holidays", "a cat on a windowsill", "birthdays", "bread", "the wind")  # fmt: skip
THINGS = ("a bakery", "a bookshop", "a podcast about cooking", "a rescue dog", "a small boat", "a garden blog",
          "a board game", "a football team", "a robot", "a coffee shop", "a band", "a hiking club",
          "a houseplant", "a goldfish", "a mobile app", "a science fair project")  # fmt: skip
ACTIVITIES = ("running a first 5k", "learning the guitar", "sleeping better", "studying for exams",
              "cooking rice", "saving money", "keeping a journal", "learning a new language", "public speaking",
              "growing tomatoes", "packing for a trip", "writing a cover letter", "staying focused",
              "making friends in a new city", "cleaning a kitchen", "taking better photos")  # fmt: skip
CONCEPTS = ("recursion", "inflation", "a metaphor", "compound interest", "a haiku", "photosynthesis", "gravity",
            "a budget", "democracy", "a prime number", "an algorithm", "a password manager", "a sonnet",
            "the water cycle", "a spreadsheet", "a vaccine", "an election", "a rainbow", "a habit", "an email")  # fmt: skip
WORDS = ("serendipity", "ephemeral", "resilient", "meticulous", "candid", "frugal", "whimsical", "benevolent",
         "tenacious", "eloquent", "nostalgia", "ambiguous", "pragmatic", "vivid", "humble", "curious",
         "diligent", "gregarious", "lucid", "stoic")  # fmt: skip
FEELINGS = ("tired", "a bit nervous about tomorrow", "happy today", "bored", "excited about the weekend",
            "stressed about work", "proud of myself", "homesick", "curious about everything", "hungry")  # fmt: skip
DISHES = ("pancakes", "a vegetable soup", "banana bread", "a simple salad", "scrambled eggs", "pasta sauce",
          "lemonade", "a stir fry", "porridge", "flatbread")  # fmt: skip

TEMPLATES = (
    "Write a short poem about {topic}.",
    "Tell me a short story about {topic}.",
    "Can you suggest a name for {thing}?",
    "Give me three ideas for {thing}.",
    "Do you have any tips for {activity}?",
    "How should I get started with {activity}?",
    "Can you explain what {concept} is?",
    "Explain {concept} to a ten-year-old.",
    "What does the word '{word}' mean?",
    "Use the word '{word}' in a sentence.",
    "Hi! My name is {name}. How are you today?",
    "Hello, I'm {name}. Nice to meet you!",
    "Good morning! I'm feeling {feeling}.",
    "I'm feeling {feeling}. Any advice?",
    "How do I make {dish}?",
    "What do I need to make {dish}?",
    "Thank you for your help!",
    "Can you tell me a joke?",
    "What can you help me with?",
    "Write a friendly message to invite {name} to dinner.",
    "Summarise why {activity} is worth it, in two sentences.",
    "Say something kind to someone who is {feeling}.",
)
SLOTS = {"topic": TOPICS, "thing": THINGS, "activity": ACTIVITIES, "concept": CONCEPTS, "word": WORDS,
         "feeling": FEELINGS, "dish": DISHES, "name": FIRST_NAMES}  # fmt: skip


class GeneralPrompts:
    """Reproducible draws of general chat prompts (one user message each)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def prompt(self) -> str:
        template = self.rng.choice(TEMPLATES)
        return template.format(**{slot: self.rng.choice(words) for slot, words in SLOTS.items()})

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
