"""Training and evaluation data: synthetic facts, English filler, local corpora."""

from .corpus import load_documents, load_qa
from .filler import FillerStream, filler_paragraphs, stdlib_paragraphs
from .synthetic import QA, RELATIONS, FactDocument, FactGenerator, chance_level

__all__ = [
    "QA", "RELATIONS", "FactDocument", "FactGenerator", "FillerStream", "chance_level", "filler_paragraphs",
    "load_documents", "load_qa", "stdlib_paragraphs",
]  # fmt: skip
