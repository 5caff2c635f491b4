"""The house's floors, read from the code: every import in src/gr2 (function-level ones included)
runs down a floor or stays in its room, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Ground up. A room imports rooms on lower floors; rooms on one floor import each other only where
# SIDEWAYS says, one way.
FLOORS = (
    ("errors", "progress"),
    ("lake", "tokenizers"),
    ("video", "robot"),
    ("sim",),
    ("training",),
    ("flows",),
)
SIDEWAYS = {
    ("robot", "video"),  # robot episodes decode and tokenize frames as the video build does
    ("tokenizers", "lake"),  # a checkpoint on the lake's store opens through the lake's one filesystem call (uri)
}

FLOOR = {room: n for n, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "gr2"


def imports(path: Path, module: str) -> set[str]:
    """The gr2 modules `path` imports, anywhere in it (a function body included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from gr2.lake import schema` names a module
    return {m for m in out if m.startswith("gr2.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "gr2").rglob("*.py")}
    return {m: {i for i in imports(p, m) if i in files and i != m} for m, p in files.items()}


def test_every_room_is_on_a_floor():
    rooms = {room(m) for m in graph()} - {"gr2"}
    assert rooms <= set(FLOOR), f"rooms on no floor: {sorted(rooms - set(FLOOR))}"


def test_imports_run_down_the_floors():
    wrong = []
    for module, targets in graph().items():
        here = room(module)
        for target in targets:
            there = room(target)
            if there in (here, "gr2"):
                continue
            if FLOOR[there] > FLOOR[here] or (FLOOR[there] == FLOOR[here] and (here, there) not in SIDEWAYS):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports running up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_modules_import_each_other_in_a_circle():
    g = graph()
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(g[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [m])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_package_is_not_importable_from_the_repo_root():
    # src layout: `python -m ...` from the root must not make our tokenizers shadow Hugging Face's
    root = SRC.parent
    assert not (root / "tokenizers").exists() and not (root / "gr2").exists()
