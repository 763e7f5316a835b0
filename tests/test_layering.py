"""The import graph of src/lvb follows the architecture: every module imports only
from its own layer or those below, so the shared vocabulary (contract, numerics,
work directory) never depends on a stage, and the runtime never on the exporter."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lvb

SRC = Path(lvb.__file__).parent

# Bottom to top. A module may import from its own layer and the layers below.
LAYERS: list[tuple[str, ...]] = [
    ("lvb", "lvb.errors"),
    ("lvb.files", "lvb.numerics", "lvb.dtypes", "lvb.spec", "lvb.text", "lvb.toolchain", "lvb.tasks", "lvb.hub"),
    ("lvb.contract",),
    ("lvb.masks", "lvb.workdir", "lvb.package", "lvb.bmodel"),
    ("lvb.check", "lvb.devicetime"),
    ("lvb.export", "lvb.compile", "lvb.runtime", "lvb.patches", "lvb.testing"),
    ("lvb.verify", "lvb.doctor", "lvb.serve"),
    ("lvb.cli",),
    ("lvb.__main__",),
]
# Within a layer, imports between different packages are allowed only along these edges.
SIDEWAYS = {
    ("lvb.compile", "lvb.runtime"),  # the simulator runs the bmodels compile checks
    ("lvb.export", "lvb.patches"),  # the patches apply while transformers' layers are traced
    ("lvb.testing", "lvb.runtime"),  # the stand-in sophon.sail runs its nets on the simulator engine
    ("lvb.verify", "lvb.doctor"),
    ("lvb.package", "lvb.workdir"),  # pack trusts an export and a compile only as their records say
    ("lvb.spec", "lvb.files"),  # config.json is read by the one rule for user files
    ("lvb.text", "lvb.files"),  # so are the tokenizer's and template's files
}
# The runtime path: what `lvb run`/`lvb chat` import. It installs on a board without these.
HEAVY = ("torch", "transformers", "onnx", "safetensors")
RUNTIME = ("lvb.runtime", "lvb.text", "lvb.masks", "lvb.contract", "lvb.spec", "lvb.numerics", "lvb.dtypes", "lvb.workdir", "lvb.devicetime",
           "lvb.errors", "lvb.files", "lvb.toolchain", "lvb.hub", "lvb.package")


def unit(module: str) -> str:
    """The entry of LAYERS a module belongs to (the longest matching prefix)."""
    names = [name for layer in LAYERS for name in layer if module == name or module.startswith(name + ".")]
    assert names, f"{module} is in no layer of tests/test_layering.py; add it"
    return max(names, key=len)


def level(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def module_name(path: Path) -> str:
    parts = ("lvb", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_import_goes_down_or_sideways_along_an_allowed_edge():
    wrong = []
    for path in SOURCES:
        here = unit(module_name(path))
        for target, line in imports(path):
            if target != "lvb" and not target.startswith("lvb."):
                continue
            there = unit(target)
            if level(there) > level(here):
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {here} imports {target}, a layer above it")
            elif level(there) == level(here) and there != here and (here, there) not in SIDEWAYS:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {here} imports {target}, not an allowed edge")
    assert not wrong, "\n".join(wrong)


def test_the_table_names_only_modules_that_exist():
    modules = {module_name(p) for p in SOURCES}
    for layer in LAYERS:
        for name in layer:
            assert any(m == name or m.startswith(name + ".") for m in modules), name


def test_the_contract_and_the_exporter_do_not_import_the_runtime():
    for path in SOURCES:
        name = module_name(path)
        if unit(name) in ("lvb.contract", "lvb.export", "lvb.numerics", "lvb.workdir", "lvb.check"):
            assert not [t for t, _ in imports(path) if t.startswith("lvb.runtime")], name


@pytest.mark.parametrize("path", [p for p in SOURCES if unit(module_name(p)) in RUNTIME], ids=lambda p: p.stem)
def test_runtime_modules_never_import_heavy_packages(path):
    heavy = [(t, line) for t, line in imports(path) if t.split(".")[0] in HEAVY]
    assert not heavy, f"{path.name} imports {heavy}"


def test_only_the_cluster_path_imports_ray():
    """Ray is an optional extra: nothing but `lvb compile --cluster` may need it."""
    importers = {module_name(p) for p in SOURCES if any(t.split(".")[0] == "ray" for t, _ in imports(p))}
    assert importers <= {"lvb.compile.cluster"}, importers


def test_the_chat_commands_import_without_heavy_packages():
    code = ("import sys, lvb.cli, lvb.runtime.pipeline, lvb.runtime.backends, lvb.runtime.onnx, lvb.runtime.cmodel; "
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_shows_this_table():
    readme = (SRC.parent.parent / "README.md").read_text()
    body = readme[readme.index("\n## Developing lvb\n"):]
    rows = [line for line in body.splitlines() if re.match(r"\| \d+ \|", line)]
    stated = [tuple(re.findall(r"`(lvb[\w.]*)`", row.split("|")[2])) for row in rows]
    assert stated == [tuple(name for name in layer if name != "lvb") for layer in LAYERS]
