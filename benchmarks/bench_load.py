"""Time to a first answer from the shipped smollm2-135m preset, against transformers' GGUF loading.

Each measurement is a fresh Python process (imports included), run in turns, medians printed:
- `latentmem first load`: `load_model("smollm2-135m")` with an empty base cache (reads the GGUF with
  the `gguf` package, writes the cache), one `inject`, one greedy answer;
- `latentmem cached`: the same with the cache from the previous run;
- `transformers GGUF`: the baseline, `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (how this preset loaded before), no memory.

    python benchmarks/bench_load.py --reps 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ANSWER = """
from latentmem.data.synthetic import question_prompt
from latentmem.models import load_model
from latentmem.training.recall import answer
model, tok = load_model("smollm2-135m")
memory = model.new_memory(0)
model.inject(memory, text="The locker code of Ada Quorn is 4711. Ada Quorn lives in Velkholm.", tokenizer=tok, allow_short=True)
print(answer(model, tok, memory, question_prompt("What is the locker code of Ada Quorn?", tok)))
"""
TRANSFORMERS = """
from transformers import AutoModelForCausalLM, AutoTokenizer
from latentmem.training.presets import SMOLLM2_GGUF, smollm2_folder
AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
"""


def timed(code: str, cache: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "LATENTMEM_CACHE": cache, "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"latentmem first load": [], "latentmem cached": [], "transformers GGUF": []}
    for _ in range(args.reps):
        cache = tempfile.mkdtemp(prefix="latentmem-bench-cache-")
        try:
            times["latentmem first load"].append(timed(ANSWER, cache))
            times["latentmem cached"].append(timed(ANSWER, cache))
            times["transformers GGUF"].append(timed(TRANSFORMERS, "off"))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    baseline = statistics.median(times["transformers GGUF"])
    print(f"smollm2-135m, {os.cpu_count()} CPUs, {args.reps} rounds (medians, fresh process each)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} {median:6.1f} s   {baseline / median:4.2f}x vs transformers GGUF")


if __name__ == "__main__":
    main()
