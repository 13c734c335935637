"""Evaluation (docs/evaluation.md): the knowledge-retention protocol, the baselines it compares, reports."""

from .datasets import build_samples, file_samples, load_qa_file, nolima_samples, synthetic_samples
from .methods import (
    LM, Answer, MemoryMethod, Method, MiniLMEmbedder, NoMemoryMethod, RAGMethod, ReplayMethod, SummaryMethod,
    build_method,
)  # fmt: skip
from .protocol import DEFAULT_CHECKPOINTS, RetentionResult, Sample, exact_hit, normalize_answer, qa_f1, run_protocol
from .report import markdown_table, plot_retention, write_results
from .long_stream import run_long_stream
from .chat_stream import ChatMethod, chat_script, run_chat, run_chat_stream
from .run import DEFAULT_METHODS, run_retention, run_stream

__all__ = [
    "DEFAULT_CHECKPOINTS", "DEFAULT_METHODS", "LM", "Answer", "ChatMethod", "MemoryMethod", "Method", "MiniLMEmbedder",
    "NoMemoryMethod", "RAGMethod", "ReplayMethod", "RetentionResult", "Sample", "SummaryMethod", "build_method",
    "build_samples", "chat_script", "exact_hit", "file_samples", "load_qa_file", "markdown_table", "nolima_samples",
    "normalize_answer", "plot_retention", "qa_f1", "run_chat", "run_chat_stream", "run_long_stream", "run_protocol", "run_retention", "run_stream",
    "synthetic_samples",
    "write_results",
]  # fmt: skip
