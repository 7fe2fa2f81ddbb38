"""The package's modules import each other one way only, and never from inside a function."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rosa"

# Each module imports only modules of a lower layer (a subpackage's modules also import each other).
LAYERS = {
    "errors": 0, "subspace": 0, "presets": 0, "bundled": 0, "optimizer_state": 0, "ranks": 0,
    "config": 1, "sharded": 1,
    "layers": 2, "wrappers": 2,
    "targets": 3,
    "model": 4,
    "schedule": 5, "checkpoint": 5, "distributed": 5, "sharded_checkpoint": 5,
    "__init__": 6,  # the top-level ``rosa`` package
    "integrations": 7,
    "experiments": 8,
    "cli": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The ``rosa`` modules an import statement names (``from . import x`` names ``rosa.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "rosa"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
        if base.split(".")[0] != "rosa":
            return []
    else:
        package = importer.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if _source(n) is not None] or [base]


def _source(module: str) -> Path | None:
    path = SRC.parent.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _group(module: str) -> str:
    """The entry of ``LAYERS`` a module belongs to: its top-level module or subpackage."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports() -> list[tuple[str, str, bool]]:
    """``(importer, imported, inside a function)`` for every import of a rosa module in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        importer = _module_name(path)
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            for imported in _imported(node, importer, path.name == "__init__.py"):
                found.append((importer, imported, id(node) in nested))
    return found


def test_the_import_scan_sees_the_package():
    pairs = {(a, b) for a, b, _ in _imports()}
    assert ("rosa.model", "rosa.layers") in pairs
    assert ("rosa.schedule", "rosa.model") in pairs
    assert ("rosa.integrations.export", "rosa.presets") in pairs


def test_no_rosa_module_is_imported_inside_a_function():
    assert [(a, b) for a, b, nested in _imports() if nested] == []


def test_imports_flow_from_lower_layers_only():
    modules = {m.stem for m in SRC.glob("*.py")} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert modules == set(LAYERS), "give every module of the package its layer in LAYERS"
    upward = [(a, b) for a, b, _ in _imports()
              if _group(a) != _group(b) and LAYERS[_group(b)] >= LAYERS[_group(a)]]
    assert upward == []
