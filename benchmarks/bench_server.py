"""Throughput and latency of `latentmem serve` under concurrent clients.

Starts the server as its own process on a loopback port (the tiny preset unless --model), then:
  1. in-process baseline: the same inject and chat calls straight on the model, no HTTP;
  2. one client, sequential requests;
  3. --clients clients at once, each on its own session (writes and reads interleaved), plus
     the same with every client on one shared session (serialised by its lock);
  4. one long inject (--long-repeats copies of the text, many chunks) and another session's chat
     sent while it runs: the chat's latency against an idle chat's (the inject hands the model
     back between chunks, so the chat should not wait for the whole inject).
Prints requests/s, p50/p95 latency per endpoint and the server's CPU seconds per request (and
cores kept busy), with ratios to the baselines. `--servers
compare` runs everything twice, against the server as issue 20 found it (`serve --no-batching
--no-journal --no-merge`: every request its own model calls through PEFT's LoRA layers, every write
rewriting its session's file) and the default one (chats of all sessions as one continuously
batched generation, writes batched per chunk, each write appended to its session's journal, LoRA
adapters merged into weight copies), and prints after/before ratios measured in the same
run; `--servers batching` compares `--no-batching` with the default, both journaled.

    python benchmarks/bench_server.py --clients 20 --rounds 10
    python benchmarks/bench_server.py --model smollm2-135m --clients 20 --rounds 10 --servers compare
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

KEY = "bench-key-0123456789abcdef"
TEXT = (
    "Ada Quorn keeps the spare key of the lighthouse under the third blue stone by the gate; "
    "her locker code is 4711 and the archive she works at opens at nine and closes at five."
)
QUESTION = "Where does Ada keep the spare key?"


# The servers `--servers` runs, by name: their `serve` flags.
SERVERS = {"before": ["--no-batching", "--no-journal", "--no-merge"], "unbatched": ["--no-batching"], "default": []}
RUNS = {"default": ["default"], "before": ["before"], "compare": ["before", "default"],
        "batching": ["unbatched", "default"]}  # fmt: skip


def start_server(args, data_dir: str, flags: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LATENTMEM_API_KEYS": f"{KEY}:bench", "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-c", "from latentmem.cli import app; app()", "serve", "--data-dir", data_dir,
               "--port", str(port), "--threads", str(args.threads), "--parallel", str(args.parallel)]  # fmt: skip
    command += ["--model", args.model] if args.model else []
    command += flags
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            if process.poll() is not None:
                sys.exit(f"server exited: {process.stderr.read()}")
            time.sleep(0.1)
    sys.exit("server did not start")


def client_run(url: str, session: str, rounds: int, max_tokens: int, timings: dict[str, list[float]]) -> None:
    """`rounds` pairs of (inject a text, ask a question) on one session, timing each request."""
    inject = {"text": TEXT, "session": session, "source": "bench"}
    ask = {"model": served_model(url), "messages": [{"role": "user", "content": QUESTION}], "session": session,
           "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
        for _ in range(rounds):
            for kind, path, body in (("inject", "/v1/memory/inject", inject), ("chat", "/v1/chat/completions", ask)):
                start = time.perf_counter()
                response = c.post(path, json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"{kind}: {response.status_code} {response.text}")
                timings[kind].append(elapsed)
                if kind == "chat":
                    timings["tokens"].append(response.json()["usage"]["completion_tokens"])


def served_model(url: str) -> str:
    return httpx.get(url + "/health").json()["model"]  # the server refuses other names (404)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far; NaN where /proc is not there."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, clients: int, rounds: int, max_tokens: int, shared: bool, pid: int) -> tuple[dict, float, float]:
    """(timings per endpoint, seconds, the server's CPU seconds) of one load."""
    timings: dict[str, list[float]] = {"inject": [], "chat": [], "tokens": []}
    cpu = cpu_seconds(pid)
    threads = [
        threading.Thread(target=client_run, args=(url, "shared" if shared else f"c{i}", rounds, max_tokens, timings))
        for i in range(clients)
    ]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return timings, time.perf_counter() - start, cpu_seconds(pid) - cpu


def in_process_baseline(args) -> dict[str, float]:
    """Median seconds of the same inject and chat calls made on the model directly."""
    import torch

    from latentmem.chat import generate_reply, memory_ids, prompt_ids
    from latentmem.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    memory = model.initial_memory()
    ids, prompt = memory_ids(tokenizer, TEXT), prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    times: dict[str, list[float]] = {"inject": [], "chat": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(5, args.rounds)):
            start = time.perf_counter()
            model.inject(memory, input_ids=ids, source="bench")
            memory.save(f"{tmp}/m.safetensors")  # the server saves after every write too
            times["inject"].append(time.perf_counter() - start)
            start = time.perf_counter()
            generate_reply(model, tokenizer, memory, prompt, max_new_tokens=args.max_tokens)
            times["chat"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def chat_during_long_inject(url: str, repeats: int, max_tokens: int) -> tuple[dict, float, float]:
    """(the long inject's response, its seconds, the seconds of a chat sent 0.5 s into it)."""
    result: dict = {}

    def long_inject():
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
            start = time.perf_counter()
            response = c.post("/v1/memory/inject", json={"text": " ".join([TEXT] * repeats), "session": "long"})
            result.update(response.json(), seconds=time.perf_counter() - start)

    writer = threading.Thread(target=long_inject)
    writer.start()
    time.sleep(0.5)
    timings: dict[str, list[float]] = {"inject": [], "chat": []}
    ask = {"model": served_model(url), "messages": [{"role": "user", "content": QUESTION}], "session": "c0",
           "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
        start = time.perf_counter()
        c.post("/v1/chat/completions", json=ask).raise_for_status()
        timings["chat"].append(time.perf_counter() - start)
    writer.join()
    return result, result.get("seconds", float("nan")), timings["chat"][0]


def requests(timings: dict) -> int:
    return len(timings["inject"]) + len(timings["chat"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve_and_load(args, names: list[str]) -> dict[str, tuple[str, dict, dict, float, float]]:
    """Start each named server (`SERVERS`) and run every load against each in turn.

    With two servers, each load runs against one and then the other before the next load, so a
    change in what else the machine runs affects both alike.
    """
    dirs = [tempfile.TemporaryDirectory() for _ in names]
    servers = {}
    try:
        for name, data_dir in zip(names, dirs):
            servers[name] = start_server(args, data_dir.name, SERVERS[name])
        urls = {name: url for name, (_, url) in servers.items()}
        model = served_model(urls[names[0]])
        for url in urls.values():
            client_run(url, "warmup", 2, args.max_tokens, {"inject": [], "chat": [], "tokens": []})
        specs = [("1 client", 1, False), (f"{args.clients} clients, own sessions", args.clients, False),
                 (f"{args.clients} clients, one session", args.clients, True)]  # fmt: skip
        runs: dict[str, dict] = {name: {} for name in names}
        for run, clients, shared in specs:
            for name in names:
                runs[name][run] = load(urls[name], clients, args.rounds, args.max_tokens, shared, servers[name][0].pid)
        longs = {name: chat_during_long_inject(urls[name], args.long_repeats, args.max_tokens) for name in names}
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
        for data_dir in dirs:
            data_dir.cleanup()
    return {name: (model, runs[name], *longs[name]) for name in names}


def report(args, base: dict, name: str, results) -> None:
    model, runs, long, long_seconds, chat_seconds = results
    flags = " ".join(SERVERS[name]) or "(defaults)"
    print(f"\n[{name}: serve {flags}] model {model}; server: 1 process, {args.parallel} model calls at once, "
          f"{args.threads} torch thread(s) each, {os.cpu_count()} CPUs; "
          f"chat = {args.max_tokens} greedy tokens, inject = {len(TEXT)}-character text + atomic save")  # fmt: skip
    print(f"in-process baseline (no HTTP, no locks): inject {base['inject'] * 1e3:.1f} ms, "
          f"chat {base['chat'] * 1e3:.1f} ms")  # fmt: skip
    print(f"{'run':<28} {'requests/s':>10} {'x 1 client':>10}   {'inject p50/p95 ms':>17} "
          f"{'chat p50/p95 ms':>17} {'chat p50 / direct':>18} {'tokens/chat':>11} {'CPU s/request':>13} "
          f"{'cores busy':>10}")  # fmt: skip
    single = None
    for run, (timings, seconds, cpu) in runs.items():
        rate = requests(timings) / seconds
        single = single or rate
        inject, chat = (
            f"{pct(timings[k], 0.5) * 1e3:>8.0f} /{pct(timings[k], 0.95) * 1e3:>7.0f}" for k in ("inject", "chat")
        )
        ratio = pct(timings["chat"], 0.5) / base["chat"]
        tokens = sum(timings["tokens"]) / max(1, len(timings["tokens"]))
        print(f"{run:<28} {rate:>10.1f} {rate / single:>10.2f}   {inject}  {chat} {ratio:>17.1f}x {tokens:>11.1f} "
              f"{cpu / requests(timings):>13.3f} {cpu / seconds:>10.2f}")  # fmt: skip
    idle = pct(runs["1 client"][0]["chat"], 0.5)
    print(
        f"long inject ({long.get('tokens')} tokens, {long.get('chunks')} chunks) took {long_seconds:.2f} s; another "
        f"session's chat sent during it took {chat_seconds:.2f} s ({chat_seconds / idle:.1f}x an idle chat's p50)"
    )


def compare(names: list[str], before, after) -> None:
    """After/before ratios of the second server against the first, run by run."""
    print(f"\n{names[1]} / {names[0]} (same run):")
    print(f"{'run':<28} {'requests/s':>10} {'chat p50':>9} {'chat p95':>9} {'inject p50':>11} {'inject p95':>11}")
    for name in before[1]:
        (t0, s0, _), (t1, s1, _) = before[1][name], after[1][name]
        rate = (requests(t1) / s1) / (requests(t0) / s0)
        cells = [pct(t1[k], q) / pct(t0[k], q) for k in ("chat", "inject") for q in (0.5, 0.95)]
        print(f"{name:<28} {rate:>9.2f}x {cells[0]:>8.2f}x {cells[1]:>8.2f}x {cells[2]:>10.2f}x {cells[3]:>10.2f}x")


def main() -> None:
    global QUESTION
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model folder or preset (default: tiny, as documented)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10, help="inject + chat pairs per client")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per chat request (greedy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per request in the server")
    parser.add_argument("--parallel", type=int, default=4, help="model calls the server runs at once")
    parser.add_argument("--long-repeats", type=int, default=100, help="copies of the text in the long inject")
    parser.add_argument("--question", default=QUESTION, help="what every chat request asks")
    parser.add_argument("--servers", choices=tuple(RUNS), default="default",
                        help="the default server, the one issue 20 found (before), both in turn (compare), or "
                        "the default against --no-batching (batching)")  # fmt: skip
    args = parser.parse_args()
    QUESTION = args.question

    base = in_process_baseline(args)
    names = RUNS[args.servers]
    results = serve_and_load(args, names)
    for name, result in results.items():
        report(args, base, name, result)
    if len(results) == 2:
        compare(names, *results.values())


if __name__ == "__main__":
    main()
