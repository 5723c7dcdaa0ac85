"""The import graph of ``platform/synthset`` as built: layered, without circles, every module importable alone.

Every ``synthset`` import counts, function-local ones included (most of the real graph hides inside
functions). A room is a folder of the package (``stages/``, ``eval/``…) or a top-level module; each
room has a layer (``LAYERS``, ground first) and may import only its own layer or lower ones.
"""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "platform" / "synthset"

# Ground first. A room imports rooms of its own layer or below, never above.
LAYERS = [
    {"__init__", "storage", "progress", "plots", "registry"},
    {"config", "diffusion/"},
    {"data/", "lora/"},
    {"models/"},
    {"eval/", "methods/"},
    {"stages/", "projection"},
    {"tracking"},
    {"pipeline"},
    {"sweep/", "cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"  # the package's own (empty) __init__.py
    if len(parts) > 1 or (PACKAGE / parts[0]).is_dir():
        return parts[0] + "/"
    return parts[0]


def imports_of(path: Path) -> set[str]:
    """Every synthset module ``path`` imports, anywhere in it (resolved to modules that exist)."""
    me, found = module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
            names += [f"{names[0]}.{a.name}" for a in node.names]  # ``from pkg import module``
        else:
            continue
        for name in names:
            if name and name.split(".")[0] == "synthset" and _exists(name):
                found.add(name)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    assert circles(graph()) == []


def test_circles_are_found_by_the_check_itself():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_room_has_a_layer_and_no_import_runs_up():
    layer = {r: i for i, rooms in enumerate(LAYERS) for r in rooms}
    edges = graph()
    rooms = {room(m) for m in edges}
    assert rooms - set(layer) == set(), "a new room: give it a layer in LAYERS"
    up = sorted(f"{a} -> {b} ({room(a)} is layer {layer[room(a)]}, {room(b)} layer {layer[room(b)]})"
                for a, targets in edges.items() for b in targets if layer[room(b)] > layer[room(a)])
    assert up == []


def test_every_module_imports_alone():
    """Each module imported first, in a process where no other synthset module is loaded yet: an import
    cycle hidden behind import order would fail here (third-party packages stay loaded between modules)."""
    modules = sorted(graph())
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'platform')!r})\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'synthset' or m.startswith('synthset.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
