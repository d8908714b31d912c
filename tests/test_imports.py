"""The import graph points one way: cli -> library, train -> model/samplers -> index, never back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "annsample"
LIBRARY_FILES = sorted(LIBRARY.rglob("*.py"))
INDEX_FILES = sorted(str(p.relative_to(LIBRARY)) for p in (LIBRARY / "index").glob("*.py"))


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, at any depth (lazy imports in functions included).

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c``, since ``c`` may be a submodule;
    relative imports are resolved against ``package``, the dotted package the source lives in.
    """
    parts = package.split(".")
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            modules.add(module)
            modules.update(f"{module}.{alias.name}" for alias in node.names)
    return modules


def file_imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(REPO).parts[:-1])
    return imported_modules(path.read_text(encoding="utf-8"), package)


def within(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in file_imports(path) if any(within(m, f) for f in forbidden))


def test_library_files_are_found():
    assert {
        LIBRARY / "index" / "item_index.py",
        LIBRARY / "samplers.py",
        LIBRARY / "train.py",
    } <= set(LIBRARY_FILES)


def test_scanner_sees_the_real_imports():
    """Guards the guards: the known edges train -> model and model -> torch.nn are found."""
    assert {"annsample.model", "annsample.model.SASRec"} <= file_imports(LIBRARY / "train.py")
    assert {"torch.nn", "torch.nn.functional"} <= file_imports(LIBRARY / "model.py")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch.nn as tnn", {"torch.nn"}),
        ("from torch import nn", {"torch", "torch.nn"}),
        ("def f():\n    import annsample.train", {"annsample.train"}),
        ("from . import cli", {"annsample", "annsample.cli"}),
        ("from .train import x", {"annsample.train", "annsample.train.x"}),
        ("from ..cli import main", {"cli", "cli.main"}),
    ],
)
def test_scanner_resolves_every_import_form(source, expected):
    assert imported_modules(source, "annsample") == expected


def test_within_matches_whole_module_names():
    assert within("torch.nn", "torch.nn") and within("torch.nn.functional", "torch.nn")
    assert not within("torch.nnx", "torch.nn") and not within("torch", "torch.nn")


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda path: path.name)
def test_library_never_imports_the_cli(path):
    assert offending(path, ("cli", "annsample.cli")) == []


@pytest.mark.parametrize("name", [*INDEX_FILES, "samplers.py", "exact_gumbel.py"], ids=str)
def test_index_and_samplers_take_tensors_not_models(name):
    """They get hidden states and the item table, never an nn.Module or the training loop."""
    forbidden = ("annsample.model", "annsample.train", "torch.nn")
    assert offending(LIBRARY / name, forbidden) == []


def test_samplers_never_import_training():
    assert offending(LIBRARY / "samplers.py", ("annsample.train", "annsample.run")) == []


def test_index_never_imports_samplers():
    for name in INDEX_FILES:
        assert offending(LIBRARY / name, ("annsample.samplers",)) == [], name


def test_torch_ivf_needs_neither_faiss_nor_the_index():
    """The pure-torch IVF runs where faiss cannot be installed (a CUDA 13 box): torch only."""
    assert (
        offending(LIBRARY / "index" / "torch_ivf.py", ("faiss", "annsample.index", "numpy")) == []
    )


def test_index_imports_only_itself_the_errors_and_the_name_registry():
    """The index never imports the model, training or the samplers: of annsample, only its own
    modules, the errors and the config's name registry."""
    outside = {
        ".".join(module.split(".")[:2])
        for name in INDEX_FILES
        for module in file_imports(LIBRARY / name)
        if within(module, "annsample") and not within(module, "annsample.index")
    }
    assert outside == {"annsample.errors", "annsample.config"}


def test_importing_the_package_is_cheap_and_the_api_loads_on_first_use():
    """``import annsample`` loads neither torch nor the API; naming an API class loads it."""
    code = (
        "import sys, annsample\n"
        "assert 'torch' not in sys.modules and 'annsample.api' not in sys.modules\n"
        "assert annsample.NegativeSampler.__module__ == 'annsample.api'\n"
        "try:\n    annsample.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'annsample' has no attribute 'no_such_name'"
