"""The tree reads as the architecture: engines' rooms import only the rooms before them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("errors", "runtime", "graphs", "imaging", "models", "methods", "insight", "batch")
"""In order: a module of a room may import its own room and the rooms before it."""
WEB = ("fastapi", "starlette", "uvicorn", "httpx", "httpx2", "service", "onnx_explain_client")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "engines" and parts[1] in ROOMS else None


def test_every_engine_module_lives_in_a_room() -> None:
    loose = [
        p.name
        for p in (ROOT / "engines").glob("*.py")
        if p.name not in ("__init__.py", "errors.py")
    ]
    assert loose == []
    for room in ROOMS[1:]:
        first_lines = (ROOT / "engines" / room / "__init__.py").read_text()
        assert first_lines.startswith('"""'), room
        assert "May import" in first_lines, room


def test_no_import_runs_back_up_and_none_reaches_the_web() -> None:
    upward, web = [], []
    for path in sorted((ROOT / "engines").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = _room(module)
        for imported in _imports(path):
            if imported.split(".")[0] in WEB:
                web.append(f"{module} imports {imported}")
            room = _room(imported)
            if own is None or room is None:
                continue
            if ROOMS.index(room) > ROOMS.index(own):
                upward.append(f"{module} imports {imported}")
    assert upward == []
    assert web == []


def test_imaging_needs_nothing_of_the_engines_but_their_errors() -> None:
    for path in (ROOT / "engines" / "imaging").rglob("*.py"):
        rooms = {_room(m) for m in _imports(path)} - {None, "imaging"}
        assert rooms <= {"errors"}, path.name
