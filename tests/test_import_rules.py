"""The import rule of docs/architecture.md: a module imports only from its own layer or the layers below it,
checked by parsing every import of every module (ast: imports inside functions included, since a lazy import
inverts a dependency just the same), and what two entry points load, checked in a fresh interpreter.

The layer table below is docs/architecture.md's ("The import rule"), longest module prefix first."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("mirage_base", "data_pipeline", "mirage_jax")
OUTSIDE = ("tools", "configs", "bench", "tests", "launch", "helpers", "train_cli")  # never imported by LIBRARY

# (module prefix, layer); a module's layer is that of its longest matching prefix
LAYERS = [
    ("mirage_base", 0),
    ("data_pipeline.dataset", 10), ("data_pipeline.encoders", 10),
    ("data_pipeline.ingest", 11), ("data_pipeline.loader", 11),
    ("data_pipeline.synthetic", 12), ("data_pipeline.curate", 12),
    ("data_pipeline", 13),  # the package root and its commands: prepare, prepare_flags, synthesize
    ("mirage_jax", 20),  # the package root (its __init__)
    ("mirage_jax.config", 20), ("mirage_jax.run_config", 20), ("mirage_jax.aot.chips", 20),
    ("mirage_jax.paths", 20), ("mirage_jax.checkpoint_format", 20), ("mirage_jax.cache_masks", 20),
    ("mirage_jax.model", 21), ("mirage_jax.diffusion", 21), ("mirage_jax.parallel", 21),
    ("mirage_jax.interop", 21), ("mirage_jax.describe", 21), ("mirage_jax.run_encoders", 21), ("mirage_jax.lora", 21),
    ("mirage_jax.train", 22), ("mirage_jax.export", 22), ("mirage_jax.inference", 22),
    ("mirage_jax.warm_start", 23), ("mirage_jax.sampling", 23), ("mirage_jax.cache_schedule", 23),
    ("mirage_jax.generate", 24), ("mirage_jax.eval", 24),
    ("mirage_jax.aot", 25), ("mirage_jax.demo", 25),
]


def layer(module: str) -> int | None:
    best = None
    for prefix, n in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, n)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, wherever it is; `from pkg import mod` counts as
    `pkg.mod` when pkg/mod is a module of this repository (so a submodule import is judged by its own layer)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_mod = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT / sub.replace(".", "/") / "__init__.py").exists()
                out.append((node.lineno, sub if is_mod else node.module))
    return out


def library_files() -> list[Path]:
    return sorted(f for pkg in LIBRARY for f in (ROOT / pkg).rglob("*.py"))


def test_every_library_module_has_a_layer() -> None:
    files = library_files()
    assert len(files) > 90  # the packages were found
    assert [module_name(f) for f in files if layer(module_name(f)) is None] == []


def test_each_module_imports_only_its_own_layer_or_below() -> None:
    bad = []
    for f in library_files():
        me = module_name(f)
        for line, name in imports(f):
            if name.split(".")[0] in OUTSIDE:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name} (outside the library)")
                continue
            theirs = layer(name)
            if theirs is not None and theirs > layer(me):
                bad.append(f"{f.relative_to(ROOT)}:{line} ({me}, layer {layer(me)}) imports {name} (layer {theirs})")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path) -> None:
    """The checker itself: an upward lazy import and an import of tools/ are found."""
    f = ROOT / "mirage_base" / "_probe_for_test.py"
    f.write_text("def f():\n    import mirage_jax.train\n    from tools import chaos\n")
    try:
        found = [name for _, name in imports(f) if name.split(".")[0] in OUTSIDE or layer(name) > layer("mirage_base")]
    finally:
        f.unlink()
    assert found == ["mirage_jax.train", "tools.chaos"]


def _loaded(statement: str) -> set[str]:
    """The top-level names in sys.modules after `statement` in a fresh interpreter (the repository on the path)."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_model_config_loads_no_encoder_and_no_scipy() -> None:
    mods = _loaded("import mirage_jax.config")
    assert "mirage_jax.config" in mods
    assert not {m for m in mods if m.startswith("data_pipeline.encoders") or m.split(".")[0] == "scipy"}


def test_torch_serving_model_loads_no_jax_scipy_or_fsspec() -> None:
    pytest.importorskip("torch")
    mods = _loaded("import mirage_jax.export.torch_model")
    assert "mirage_jax.export.torch_model" in mods and "torch" in mods
    assert not {m for m in mods if m.split(".")[0] in ("jax", "jaxlib", "flax", "scipy", "fsspec", "gcsfs")}


def test_prepare_reading_its_size_flags_loads_no_synthesizer() -> None:
    """prepare's --size parsing once imported data_pipeline.synthesize (and through it scipy.signal): 1.1 s of every
    prepare run's start-up spent on the footage synthesizer, serial before any work reaches a Dask worker."""
    mods = _loaded("from data_pipeline import prepare, buckets; buckets.parse_sizes('64x96,96x64')")
    assert "data_pipeline.prepare" in mods
    assert not {m for m in mods if m.startswith(("data_pipeline.synthe", "scipy.signal"))}
