"""The wheel a board installs: `python -m build` from a clean copy of the sources, installed
into a fresh virtual environment with its default (lean) dependencies and onnxruntime, then
answering a toy picture from a package made with `lvb pack --onnx`.

pip resolves the wheel's own dependency metadata, so a heavy default dependency would be
installed (and is asserted absent). Versions are held to this venv's (`pip freeze` as
constraints), which pip's cache already holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lvb.package import pack
from lvb.tasks import QUESTION, sample

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "onnx", "safetensors")

# Main's tiers: the toy pipeline (compile, simulator) runs in the setup of whichever of its
# users comes first, so these carry test_pipeline's marks and timeout.
pytestmark = [pytest.mark.toolchain, pytest.mark.slow, pytest.mark.timeout(3600)]


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=1800, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def test_the_wheel_answers_from_a_package_with_the_lean_runtime(toy_pipeline, tmp_path):
    work, result = toy_pipeline("int4")
    assert result.returncode == 0, result.stderr[-2000:]

    # Build from a copy, so the build's egg-info and build/ never land in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("lvb-*.whl"))

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    freeze = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable").stdout
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(line for line in freeze.splitlines() if not line.startswith(("-e", "lvb"))))
    # Without PYTHONPATH: a checkout on it makes pip take lvb as installed already.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(venv / "bin" / "pip", "install", "--quiet", "-c", constraints, wheel, "onnxruntime", env=clean)
    installed = json.loads(run(venv / "bin" / "pip", "list", "--format", "json", env=clean).stdout)
    names = {p["name"].lower().replace("_", "-") for p in installed}
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    assert {"lvb", "numpy", "pillow", "tokenizers", "jinja2", "typer", "rich", "onnxruntime"} <= names

    package = pack(work, tmp_path / "package", quant="int4", onnx=True)
    image, answer = sample(1, 13)[0]
    image.save(tmp_path / "picture.png")
    # Run from elsewhere, with nothing of the checkout on the path: the wheel's lvb alone.
    reply = run(venv / "bin" / "lvb", "run", "--package", package.directory, "--prompt", QUESTION,
                "--image", tmp_path / "picture.png", "--greedy", cwd=tmp_path, env={"PATH": str(venv / "bin"), "HOME": str(tmp_path)})
    assert reply.stdout.strip() == answer
