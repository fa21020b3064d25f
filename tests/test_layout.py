"""The layout: the lint config is clean, every module imports on its own, and
no two modules import each other at import time (a cycle would make the
result depend on which one is imported first)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("*.py"), *(ROOT / "prefopt").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
TOP_LEVEL = {"train.py", "trainers.py", "preference_datasets.py", "utils.py", "compare.py", "study.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_edges(path: Path, ours: set[str]) -> set[str]:
    """Our modules that `path` imports when it is imported: statements at
    module level (imports inside functions run later, on use)."""
    edges = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        edges |= {n for n in names if n in ours}
    return edges


def test_root_holds_only_what_a_user_types_or_the_brief_names():
    assert {p.name for p in ROOT.glob("*.py")} == TOP_LEVEL


def test_no_import_cycles():
    ours = {module_name(p) for p in SOURCES}
    graph = {module_name(p): import_time_edges(p, ours) for p in SOURCES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_imports_on_its_own():
    """Each in a fresh interpreter state for our modules (third-party ones,
    e.g. torch, stay loaded: this checks our imports, not theirs)."""
    names = [module_name(p) for p in SOURCES if p.name not in ("train.py",)]   # train.py runs Hydra on import
    script = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]\n"
        f"ours = {names!r}\n"
        "for name in ours:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in {n.split('.')[0] for n in ours}]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(ours))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
