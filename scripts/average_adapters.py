"""Average memory adapters weight by weight (a "model soup" of runs that continued one another).

The adapters must come from one lineage (each leg continued the last with `--init`), so their LoRA
factors live in the same basis; the header (layout, K, ...) is taken from the last one.

    python scripts/average_adapters.py runs/leg3/adapter runs/leg5/adapter --out runs/soup/adapter
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentmem.presets.adapter import ADAPTER_FILE


def average(folders: list[Path], out: Path, weights: list[float] | None = None) -> Path:
    """Write the weighted mean of the adapters in `folders` (equal weights by default) to `out`."""
    weights = weights or [1.0 / len(folders)] * len(folders)
    if len(weights) != len(folders) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"need one weight per adapter, summing to 1; got {weights}")
    tensors = [load_file(folder / ADAPTER_FILE) for folder in folders]
    names = set(tensors[0])
    if any(set(t) != names for t in tensors[1:]):
        raise ValueError("the adapters hold different tensors: not one model's adapters")
    with safe_open(folders[-1] / ADAPTER_FILE, "pt") as f:
        header = f.metadata()
    mean = {name: sum(w * t[name].float() for w, t in zip(weights, tensors)).to(tensors[0][name].dtype) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    save_file(mean, out / ADAPTER_FILE, metadata=header)
    return out / ADAPTER_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter folders (each holding memory_adapter.safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", help="comma-separated, one per adapter (default: equal)")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    print(f"wrote {average(args.adapters, args.out, weights)}")


if __name__ == "__main__":
    main()
