"""data_pipeline sits below mirage_jax (docs/architecture.md, "The import rule"): no module of it imports
mirage_jax, at the top or inside a function (a lazy import inverts the dependency just the same)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_data_pipeline_never_imports_mirage_jax() -> None:
    files = sorted((ROOT / "data_pipeline").rglob("*.py"))
    assert len(files) > 20  # the package was found
    bad = [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for line, name in _imports(f)
           if name == "mirage_jax" or name.startswith("mirage_jax.")]
    assert not bad, bad
