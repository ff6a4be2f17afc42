"""The tree's shape: layers that import only downward, no import circle (lazy imports counted), short
functions, and an ``import tbptt`` that loads nothing heavy. ``docs/architecture.md`` draws it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "tbptt"

# lowest first; a module may import its own layer and those below, never one above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("validate", "files", "saved", "schedule", "state", "decay", "artbp", "adaptive", "schedules")),
    ("contract", ("contract", "steps")),
    ("models", ("models",)),
    ("data", ("data",)),
    ("engine", ("stream_state", "stored", "checkpointing", "compensation", "lagscan", "engine", "memory", "gradients")),
    ("model check", ("modelcheck",)),
    ("trainer", ("records", "budget", "checkpoint", "safestep", "precision", "update", "fit", "trainer")),
    ("diagnostics", ("diagnostics",)),
    ("experiments", ("experiments",)),
    ("integrations", ("distributed", "lightning")),
    ("public API", ("__init__",)),
    ("bench", ("bench",)),
    ("command line", ("cli", "commands", "__main__")),
]
HEAVY = ("rich", "tqdm", "matplotlib", "pandas", "statsmodels", "lightning")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"module tbptt.{module} is in no layer of LAYERS; add it where it belongs")


def _imports(path: Path) -> set[str]:
    """Every tbptt module ``path`` imports, at any depth of the file (lazy imports included;
    ``if TYPE_CHECKING:`` blocks too, since they draw the same arrow)."""
    module = _module_name(path)
    if module == "__init__":
        package: list[str] = []
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else list(package)
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "tbptt":
                target = node.module[len("tbptt"):].lstrip(".")
            else:
                continue
            subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            # `from . import x` and `from .pkg import sub` name modules; other names are the package's
            names = [n for n in subs if _is_module(n)]
            if node.module or len(names) < len(subs):
                names.append(target)
            found.update(n if n else "__init__" for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("tbptt."):] for a in node.names if a.name.startswith("tbptt."))
    found.discard(module)
    return {f for f in found if f}


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                wrong.append(f"tbptt.{module} ({LAYERS[_layer(module)][0]}) imports tbptt.{target} "
                             f"({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    graph = _graph()
    graph = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(f"tbptt.{m}" for m in cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_function_over_80_lines() -> None:
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({length} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


@pytest.mark.parametrize("statement", ["import tbptt", "import tbptt.cli; tbptt.cli.build_parser()"])
def test_import_loads_nothing_heavy(statement: str) -> None:
    # measured against torch's own imports: torch.hub itself loads tqdm when it is installed
    code = (f"import sys, torch; before = set(sys.modules); {statement}; "
            f"print(sorted({{m.split('.')[0] for m in set(sys.modules) - before}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{statement} loads {out.strip()}"
