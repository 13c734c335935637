"""Retention results on disk: records as JSON and CSV, curves as a PNG, a markdown table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .protocol import RetentionResult


def write_results(
    result: RetentionResult, out_dir: str | Path, at: tuple[int, ...] | None = None,
    xlabel: str = "distractors after the context",
) -> dict[str, Path]:  # fmt: skip
    """results.json (config, summary, peak memory, records), results.csv (records),
    retention.png and table.md (accuracy at the distractor counts `at`) in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    paths = {"json": out / "results.json", "csv": out / "results.csv", "png": out / "retention.png", "md": out / "table.md"}
    payload = {
        "config": result.config,
        "summary": {m: {str(n): v for n, v in rows.items()} for m, rows in summary.items()},
        "peak_memory": result.peak_memory,
        "records": result.records,
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    if result.records:
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result.records[0]))
            writer.writeheader()
            writer.writerows(result.records)
    else:
        paths["csv"].write_text("")
    plot_retention(summary, paths["png"], xlabel=xlabel)
    paths["md"].write_text(markdown_table(result, **({"at": at} if at else {})) + "\n")
    return paths


def plot_retention(summary: dict, path: str | Path, xlabel: str = "distractors after the context") -> Path:
    """Exact-hit accuracy vs distractors (left) and vs tokens injected (right), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in summary.items():
        ns = sorted(rows)
        accuracy = [rows[n]["exact"] for n in ns]
        left.plot(ns, accuracy, marker="o", label=method)
        right.plot([rows[n]["tokens_injected"] for n in ns], accuracy, marker="o", label=method)
    left.set(xlabel=xlabel, ylabel="exact hit", ylim=(-0.02, 1.02), title="retention")
    right.set(xlabel="tokens injected", ylim=(-0.02, 1.02), title="retention vs tokens")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def markdown_table(result: RetentionResult, at: tuple[int, ...] = (0, 10, 50)) -> str:
    """Per method: accuracy at the given distractor counts, mean prompt tokens, mean latency, peak RSS."""
    summary = result.summary()
    head = ["method", *[f"acc@{n}" for n in at], "prompt tokens", "latency (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rows in summary.items():
        accs = [f"{rows[n]['exact']:.2f}" if n in rows else "–" for n in at]
        weights = [rows[n]["n"] for n in rows]
        mean = lambda key: sum(rows[n][key] * rows[n]["n"] for n in rows) / sum(weights)  # noqa: E731
        rss = result.peak_memory.get(method, {}).get("rss_mb", float("nan"))
        lines.append(f"| {method} | " + " | ".join(accs) + f" | {mean('prompt_tokens'):.0f} | {mean('latency_s'):.3f} | {rss:.0f} |")
    return "\n".join(lines)
