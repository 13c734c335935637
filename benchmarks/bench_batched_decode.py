"""Chat requests of many users with long replies, in process: 4 at a time alone vs one continuous batch.

Each of --users states gets one write; then every user asks the same question, and every reply runs
to --tokens greedy tokens (end of turn is switched off here, so the decoding share is known). First
the unbatched server's way (`generate_reply`, --parallel calls at once, as `serve --no-batching`),
then `ChatBatcher` (as `serve`). Prints both times, the ratio and whether the texts agree.

    python benchmarks/bench_batched_decode.py --model smollm2-135m --users 20 --tokens 32
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import latentmem.chat as chat_module
import latentmem.server.batching as batching_module
from latentmem.chat import generate_reply, memory_ids, prompt_ids
from latentmem.models import load_model
from latentmem.server.batching import ChatBatcher

FACT = "Ada Quorn keeps the spare key of the lighthouse under the third blue stone by the gate."
QUESTION = "Where does Ada keep the spare key?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per reply (no end of turn)")
    parser.add_argument("--parallel", type=int, default=4, help="unbatched calls at once (serve --parallel)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chat_module._eos_ids = batching_module._eos_ids = lambda model, tokenizer: []  # every reply runs to --tokens
    model, tokenizer = load_model(args.model)
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    states = [model.initial_memory() for _ in range(args.users)]
    for state in states:
        model.inject(state, input_ids=memory_ids(tokenizer, FACT), allow_short=True)
    with torch.inference_mode():
        for state in states:  # both ways start from cached memory prefixes
            model.memory_prefix(state)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        alone = list(
            pool.map(lambda s: generate_reply(model, tokenizer, s, prompt, max_new_tokens=args.tokens), states)
        )
    unbatched = time.perf_counter() - start
    batcher = ChatBatcher(model, tokenizer)
    start = time.perf_counter()
    rows = [batcher.submit(state, prompt, max_new_tokens=args.tokens) for state in states]
    replies = [batcher.wait(row) for row in rows]
    batched = time.perf_counter() - start
    batcher.close()
    same = sum(a.text == b.text for a, b in zip(alone, replies))
    print(f"{args.users} requests x {args.tokens} tokens, {len(prompt)}-token prompt, model {args.model}: "
          f"{args.parallel} at a time alone {unbatched:.1f} s, one batch {batched:.1f} s "
          f"({unbatched / batched:.2f}x; {batcher.steps} steps); same text {same}/{args.users}")  # fmt: skip


if __name__ == "__main__":
    main()
