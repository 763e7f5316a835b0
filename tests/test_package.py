"""`lvb pack` and `--package`: the toy's INT4 bmodel (from the session's ci/pipeline.sh run)
packed, copied to a fresh folder and answering from there alone on the simulator; a damaged
or mismatched file stops `lvb run` with one line before anything loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lvb.package import MANIFEST, PackageError, open_package, pack
from lvb.tasks import QUESTION, sample

# Main's tiers: the toy pipeline (compile, simulator) runs in the setup of whichever of its
# users comes first, so these carry test_pipeline's marks and timeout.
pytestmark = [pytest.mark.toolchain, pytest.mark.slow, pytest.mark.timeout(3600)]


def lvb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvb.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def toy_work(toy_pipeline):
    work, result = toy_pipeline("int4")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work


@pytest.fixture(scope="module")
def packed(toy_work, tmp_path_factory):
    return pack(toy_work, tmp_path_factory.mktemp("packages") / "toy", quant="int4", tar=True)


def test_manifest_lists_every_file_with_its_sha256_and_no_weights(packed, toy_work):
    files = packed.manifest["files"]
    on_disk = {p.relative_to(packed.directory).as_posix() for p in packed.directory.rglob("*")
               if p.is_file() and p.name not in (MANIFEST, ".lvb-checked.json")}
    assert set(files) == on_disk
    for relative, entry in files.items():
        data = (packed.directory / relative).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert packed.manifest["bmodel"].endswith(".bmodel") and packed.manifest["bmodel"] in files
    assert not any(name.endswith((".safetensors", ".onnx", ".weights")) for name in files)
    for small in ("config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json",
                  "generation_config.json"):
        assert f"checkpoint/{small}" in files
    assert packed.manifest["versions"]["tpu_mlir"] and packed.manifest["versions"]["lvb"]
    exported = json.loads((toy_work / "export" / "manifest.json").read_text())["settings"]
    assert packed.manifest["settings"]["quant"] == "int4"
    assert (packed.manifest["settings"]["seq"], packed.manifest["settings"]["chunks"]) == (exported["seq"], exported["chunks"])


def test_the_tar_holds_the_same_package(packed, tmp_path):
    with tarfile.open(packed.directory.with_name("toy.tar.gz")) as archive:
        archive.extractall(tmp_path, filter="data")
    assert open_package(tmp_path / "toy").manifest == packed.manifest


def test_a_copy_answers_from_the_package_alone(packed, tmp_path):
    copy = tmp_path / "elsewhere" / "package"
    shutil.copytree(packed.directory, copy)
    image, answer = sample(1, 11)[0]
    image.save(tmp_path / "picture.png")
    result = lvb("run", "--package", str(copy), "--backend", "cmodel", "--prompt", QUESTION,
                 "--image", str(tmp_path / "picture.png"), "--greedy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == answer


@pytest.mark.parametrize("damage, named", [
    ("flip a byte of the bmodel", "sha256 differs"),
    ("truncate the tokenizer", "bytes, the package manifest says"),
    ("swap in another config", "sha256 differs"),
    ("delete the chat template", "is missing"),
    ("break the manifest", "is damaged"),
])
def test_a_damaged_package_is_refused_in_one_line(damage, named, packed, tmp_path):
    copy = tmp_path / "package"
    shutil.copytree(packed.directory, copy)
    open_package(copy)  # stamps every file as checked: damage must still be seen
    bmodel = copy / packed.manifest["bmodel"]
    target = {"flip a byte of the bmodel": bmodel, "truncate the tokenizer": copy / "checkpoint" / "tokenizer.json",
              "swap in another config": copy / "checkpoint" / "config.json",
              "delete the chat template": copy / "checkpoint" / "chat_template.jinja",
              "break the manifest": copy / MANIFEST}[damage]
    if damage.startswith("flip"):
        with open(target, "r+b") as f:
            f.seek(target.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:-10])
    elif damage.startswith("swap"):
        config = json.loads(target.read_text())
        config["text_config"]["rope_theta"] = config["text_config"].get("rope_theta", 1) + 1
        text = json.dumps(config)
        target.write_text(text + " " * max(0, target.stat().st_size - len(text)))
    elif damage.startswith("delete"):
        target.unlink()
    else:
        target.write_text("{")
    line = one_line_error(lvb("run", "--package", str(copy), "--prompt", QUESTION, cwd=tmp_path))
    assert named in line and target.name in line


def test_pack_replaces_an_older_package_and_refuses_other_folders(packed, toy_work, tmp_path):
    out = tmp_path / "toy"
    pack(toy_work, out, quant="int4")
    (out / "stale-file").write_text("from an older package")
    pack(toy_work, out, quant="int4")
    assert not (out / "stale-file").exists() and open_package(out)
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temporary folder left behind
    other = tmp_path / "photos"
    other.mkdir()
    with pytest.raises(PackageError, match="not an lvb package"):
        pack(toy_work, other)
    with pytest.raises(PackageError, match="no bf16 bmodel"):
        pack(toy_work, tmp_path / "bf16", quant="bf16")
    assert not (tmp_path / "bf16").exists()


def test_run_with_a_package_imports_no_torch_transformers_or_onnx(toy_work, tmp_path):
    """The lean runtime path: `lvb run --package` on onnxruntime, in a fresh interpreter that has
    torch, transformers and onnx installed (this venv) but must not import them."""
    package = pack(toy_work, tmp_path / "package", quant="int4", onnx=True)
    image, answer = sample(1, 12)[0]
    image.save(tmp_path / "picture.png")
    code = (
        "import sys\n"
        "from lvb.cli import app\n"
        "try:\n"
        f"    app(['run', '--package', {str(package.directory)!r}, '--backend', 'onnxruntime', '--greedy',\n"
        f"         '--prompt', {QUESTION!r}, '--image', {str(tmp_path / 'picture.png')!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted({'torch', 'transformers', 'onnx', 'safetensors'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == answer
