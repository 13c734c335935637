"""Throughput, latency and lost writes of the Ray Serve deployment (`latentmem serve --ray`).

Starts an S3-compatible server (moto's, as its own process on a loopback port; or --store URL for a
real one: a folder or s3://bucket/prefix with credentials in the environment), then for each
--replicas count: `latentmem serve --ray --replicas R --store ...` as its own process (its own
local Ray instance), --clients clients at once, each on its own session, --rounds pairs of
(inject, chat) each. For comparison the same load runs against plain `latentmem serve` (one
process, states on its local disk). Every acknowledged inject is then looked for in its session's
memory: "lost" counts those missing (must be 0); "errors" counts non-200 answers (must be 0).

    python benchmarks/bench_ray.py --replicas 1 2 --clients 4 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
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
BUCKET = "latentmem-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server as its own process (not sharing this process's GIL with the clients)."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    for _ in range(300):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            return server, endpoint
        except Exception:  # noqa: BLE001 (not listening yet)
            time.sleep(0.1)
    sys.exit("moto's S3 server did not start")


def start_server(args, extra: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **env, "LATENTMEM_API_KEYS": f"{KEY}:bench", "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-c", "from latentmem.cli import app; app()", "serve", "--port", str(port),
               "--threads", str(args.threads), "--parallel", str(args.parallel), *extra]  # fmt: skip
    command += ["--model", args.model] if args.model else []
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}: {' '.join(command)}")
        time.sleep(0.1)
    sys.exit("server did not start")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)  # serve shuts Ray Serve down on Ctrl-C
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def client_run(url, session, rounds, max_tokens, timings, acked, errors, model, replicas=None) -> None:
    ask = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "session": session,
           "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
        for i in range(rounds):
            inject = {"text": TEXT, "session": session, "source": f"{session}-{i}"}
            for kind, path, body in (("inject", "/v1/memory/inject", inject), ("chat", "/v1/chat/completions", ask)):
                start = time.perf_counter()
                try:
                    response = c.post(path, json=body)
                except httpx.TransportError as err:
                    errors.append(f"{kind}: {err!r}")
                    continue
                timings[kind].append(time.perf_counter() - start)
                if replicas is not None and "x-latentmem-replica" in response.headers:
                    replicas.add(response.headers["x-latentmem-replica"])
                if response.status_code != 200:
                    errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
                elif kind == "inject":
                    acked.append((session, body["source"]))


def run_load(url: str, args, tag: str) -> dict:
    model = httpx.get(url + "/health").json()["model"]
    warm: dict = {"inject": [], "chat": []}
    client_run(url, f"{tag}-warm", 1, args.max_tokens, warm, [], [], model)
    timings: dict[str, list[float]] = {"inject": [], "chat": []}
    acked: list = []
    errors: list = []
    replicas: set = set()
    threads = [
        threading.Thread(
            target=client_run,
            args=(url, f"{tag}-c{i}", args.rounds, args.max_tokens, timings, acked, errors, model, replicas),
        )
        for i in range(args.clients)
    ]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    seconds = time.perf_counter() - start
    return {"timings": timings, "seconds": seconds, "acked": acked, "errors": errors, "model": model,
            "replicas": len(replicas)}  # fmt: skip


def lost_writes(url: str, acked: list) -> int:
    present: dict[str, set] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
        for session in {s for s, _ in acked}:
            reply = c.get("/v1/memory", params={"session": session})
            reply.raise_for_status()
            present[session] = {row["source"] for row in reply.json()["sources"]}
    return sum(source not in present.get(session, set()) for session, source in acked)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or preset (default: the embedded default model)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="inject + chat pairs per client")
    parser.add_argument("--max-tokens", type=int, default=8, help="generated tokens per chat request (greedy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per request in each replica")
    parser.add_argument("--parallel", type=int, default=4, help="model calls each replica runs at once")
    parser.add_argument("--store", default=None, help="a folder or s3:// URL (default: moto's S3 server, started here)")
    parser.add_argument("--no-baseline", action="store_true", help="skip plain `latentmem serve`")
    args = parser.parse_args()

    env, moto = {}, None
    if args.store is None:
        moto, endpoint = start_moto()
        args.store = f"s3://{BUCKET}/bench"
        env = {"AWS_ENDPOINT_URL_S3": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    results = {}
    try:
        if not args.no_baseline:
            with tempfile.TemporaryDirectory() as data_dir:
                process, url = start_server(args, ["--data-dir", data_dir], env)
                try:
                    results["latentmem serve (1 process, local disk)"] = (run_load(url, args, "plain"), url)
                    results["latentmem serve (1 process, local disk)"][0]["lost"] = lost_writes(
                        url, results["latentmem serve (1 process, local disk)"][0]["acked"]
                    )
                finally:
                    stop(process)
        for replicas in args.replicas:
            started = time.perf_counter()
            process, url = start_server(args, ["--ray", "--replicas", str(replicas), "--store", args.store], env)
            startup = time.perf_counter() - started
            try:
                result = run_load(url, args, f"r{replicas}")
                result["lost"] = lost_writes(url, result["acked"])
                result["startup"] = startup
                results[f"Ray Serve, {replicas} replica(s), {args.store.split(':')[0]} store"] = (result, url)
            finally:
                stop(process)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(30)
    any_result = next(iter(results.values()))[0]
    print(f"model {any_result['model']}; {os.cpu_count()} CPUs seen; {args.clients} clients x {args.rounds} rounds of "
          f"(inject {len(TEXT)} characters, chat {args.max_tokens} greedy tokens); {args.threads} torch thread(s) "
          f"per request, {args.parallel} model calls at once per replica")  # fmt: skip
    print(f"{'run':<44} {'req/s':>6} {'inject p50/p95 ms':>18} {'chat p50/p95 ms':>17} {'errors':>6} {'lost':>5}"
          f" {'start s':>7} {'replicas answering':>18}")  # fmt: skip
    for name, (result, _) in results.items():
        timings = result["timings"]
        rate = sum(map(len, timings.values())) / result["seconds"]
        inject, chat = (f"{pct(timings[k], 0.5) * 1e3:>8.0f} /{pct(timings[k], 0.95) * 1e3:>7.0f}" for k in timings)
        start = f"{result['startup']:>7.0f}" if "startup" in result else f"{'':>7}"
        answering = result["replicas"] or ""
        print(f"{name:<44} {rate:>6.1f} {inject:>18} {chat:>17} {len(result['errors']):>6} {result['lost']:>5} {start}"
              f" {answering:>18}")  # fmt: skip
        for error in result["errors"][:5]:
            print(f"    error: {error}")


if __name__ == "__main__":
    main()
