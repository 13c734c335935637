"""Plots for the model cards: training loss over several legs, and retention over a stream.

    python scripts/plot_curves.py training docs/smollm2-135m-metrics.jsonl --out docs/smollm2-135m-training.png
    python scripts/plot_curves.py stream runs/a.json:"before" runs/b.json:"after" --out docs/smollm2-135m-retention.png

`training` reads `metrics.jsonl` records (`step`, `loss`; an optional `leg` field numbers runs that
continued one another with `--init`) and draws the loss and its moving average over all steps, a
line where each leg starts. `stream` reads `scripts/stream_retention.py --out` files and draws, per
file and read way, the share of questions answered against writes after the fact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(files: list[Path], out: Path, window: int = 8) -> None:
    records = [json.loads(line) for path in files for line in path.open() if '"loss"' in line]
    steps, losses, starts, offset, last_leg, last_step = [], [], [], 0, None, 0
    for record in records:
        leg = record.get("leg", 0)
        if leg != last_leg:  # a new leg counts on from where the previous one ended
            offset, last_leg = last_step, leg
            starts.append(offset)
        last_step = offset + record["step"]
        steps.append(last_step)
        losses.append(record["loss"])
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, losses, color="0.75", linewidth=0.8, label="loss (logged steps)")
    ax.plot(steps, smooth, color="C0", label=f"moving average ({window} logs)")
    for start in starts[1:]:
        ax.axvline(start, color="C3", linestyle=":", linewidth=1)
    ax.set_xlabel("step (4 episodes each)")
    ax.set_ylabel("answer cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_stream(specs: list[str], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for spec in specs:
        path, _, label = spec.partition(":")
        data = json.loads(Path(path).read_text())
        ways = [k for k in data["records"][0] if k not in ("fact", "after", "question", "answer", "ranked_first")]
        checkpoints = sorted({r["after"] for r in data["records"]})
        for way in ways:
            rows = [[r[way] for r in data["records"] if r["after"] == n] for n in checkpoints]
            ax.plot(checkpoints, [sum(r) / len(r) for r in rows], marker="o", label=f"{label or path} ({way})")
    ax.set_xlabel("writes after the fact")
    ax.set_ylabel("exact hit (teacher-forced)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["training", "stream"])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.kind == "training":
        plot_training([Path(p) for p in args.inputs], args.out)
    else:
        plot_stream(args.inputs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
