"""docs/architecture.md's rooms table is the import rule: every import in lazygraph/ (function-level
ones included) must stay inside its room or go to a room the table lets it import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lazygraph"
PAGE = ROOT / "docs" / "architecture.md"

# Edges the table does not allow, each waiting for a change in a file its room's owner is changing:
# (importing module, imported room). Keep it short; test_no_stale_exceptions fails once one is fixed.
EXCEPTIONS = {
    # kernel_source takes a passes.fuse.FusionGroup (its loop program and node names); the group
    # type belongs with the loop programs
    ("lazygraph/codegen_triton.py", "passes"),
    ("lazygraph/codegen/uses.py", "passes"),
}


def read_rooms(text: str) -> dict[str, dict]:
    """{room: {"paths": [...], "imports": set of rooms or {"*"}}} from the page's rooms table."""
    section = text.split("## Rooms", 1)[1]
    rooms = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or cells[0] in ("room", "") or set(cells[0]) <= {"-"}:
            continue
        room, paths, _holds, may = cells
        imports = {"*"} if may == "everything" else set() if may in ("—", "-") else {
            r.strip() for r in may.split(",")}
        rooms[room] = {"paths": re.findall(r"`([^`]+)`", paths), "imports": imports}
    return rooms


def room_of(rel: str, rooms: dict[str, dict]) -> str | None:
    """The room whose path is the longest prefix of `rel` (a path inside lazygraph/)."""
    best, best_len = None, -1
    for room, spec in rooms.items():
        for p in spec["paths"]:
            if (rel == p or (p.endswith("/") and rel.startswith(p))) and len(p) > best_len:
                best, best_len = room, len(p)
    return best


def _module_file(dotted: str) -> Path | None:
    """lazygraph.a.b -> lazygraph/a/b.py or lazygraph/a/b/__init__.py (None outside lazygraph)."""
    parts = dotted.split(".")
    if parts[0] != "lazygraph":
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path) -> list[tuple[int, Path]]:
    """(line, file imported) for every lazygraph import in `path`, at any depth of the module."""
    dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from package import name` imports the submodule `name` when there is one
            targets = [f"{module}.{a.name}" if _module_file(f"{module}.{a.name}") else module for a in node.names]
        else:
            continue
        for t in targets:
            f = _module_file(t)
            if f is not None:
                found.append((node.lineno, f))
    return found


def violations(rooms: dict[str, dict], files: list[Path]) -> tuple[list[str], set[tuple[str, str]]]:
    """Imports the table forbids (excepting EXCEPTIONS), and the exceptions that were needed."""
    bad, used = [], set()
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        mine = room_of(rel, rooms)
        if mine is None:
            bad.append(f"lazygraph/{rel}: in no room of docs/architecture.md")
            continue
        allowed = rooms[mine]["imports"]
        for line, target in imports_of(path):
            theirs = room_of(target.relative_to(PACKAGE).as_posix(), rooms)
            if theirs == mine or "*" in allowed or theirs in allowed:
                continue
            key = (f"lazygraph/{rel}", theirs)
            if key in EXCEPTIONS:
                used.add(key)
                continue
            bad.append(f"lazygraph/{rel}:{line} ({mine}) imports {target.relative_to(ROOT)} ({theirs})")
    return bad, used


@pytest.fixture(scope="module")
def rooms() -> dict[str, dict]:
    return read_rooms(PAGE.read_text())


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_follows_the_rooms_table(rooms):
    bad, _ = violations(rooms, _sources())
    assert not bad, "imports the rooms table of docs/architecture.md does not allow:\n" + "\n".join(bad)


def test_no_stale_exceptions(rooms):
    _, used = violations(rooms, _sources())
    assert used == EXCEPTIONS, f"exceptions no longer needed: {sorted(EXCEPTIONS - used)}"


def test_the_table_names_rooms_and_paths_that_exist(rooms):
    assert {"ir", "capture", "passes", "codegen", "runtime", "api"} <= set(rooms)
    for room, spec in rooms.items():
        assert spec["paths"], room
        for p in spec["paths"]:
            assert (PACKAGE / p).exists(), f"room {room}: lazygraph/{p} does not exist"
        assert spec["imports"] <= set(rooms) | {"*"}, f"room {room} may import an unknown room"


def test_a_forbidden_import_is_found(rooms, tmp_path, monkeypatch):
    """The checker itself: ir.py importing capture (function-level, as hidden imports are) fails."""
    fake_root = tmp_path
    (fake_root / "lazygraph" / "capture").mkdir(parents=True)
    (fake_root / "lazygraph" / "capture" / "__init__.py").write_text("")
    (fake_root / "lazygraph" / "state.py").write_text("")
    (fake_root / "lazygraph" / "ir.py").write_text(
        "from . import state\n\ndef f():\n    from .capture import LazyTensor\n")
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    monkeypatch.setitem(globals(), "PACKAGE", fake_root / "lazygraph")
    bad, _ = violations(rooms, [fake_root / "lazygraph" / "ir.py"])
    assert bad == ["lazygraph/ir.py:4 (ir) imports lazygraph/capture/__init__.py (capture)"]
