"""The CLI through Typer's CliRunner, and doctor's real end-to-end toolchain check."""

import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lvb
from helpers import one_error_line
from lvb.check import DOCTOR_MIN_COSINE
from lvb.cli import app
from lvb.toolchain import find_toolchain

runner = CliRunner()


STAGES = ("doctor", "export", "compile", "inspect", "pack", "run", "chat", "serve", "verify")


def test_help_lists_the_stages():
    """Every command the README uses, and no other, each in --help with its own summary."""
    import typer.main

    commands = typer.main.get_command(app).commands
    assert sorted(commands) == sorted(STAGES)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert {name for name in STAGES if f"lvb {name} " in readme} == set(STAGES)
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name, command in commands.items():
        summary = " ".join(command.help.split())[:60]
        assert re.search(rf"^│ {name} +{re.escape(summary)}", result.output, re.M), (name, result.output)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and lvb.__version__ in result.output


def test_doctor_with_a_missing_toolchain_names_it(tmp_path):
    missing = tmp_path / "no-such-toolchain"
    result = runner.invoke(app, ["doctor", "--toolchain", str(missing)])
    assert result.exit_code == 1
    assert str(missing) in result.output and "model_transform.py" in result.output


def test_an_error_quoting_a_path_prints_it_as_it_is(tmp_path):
    """Rich would swallow `[red]` as markup: error lines quote paths and tool output verbatim."""
    missing = tmp_path / "[red]toolchain"
    output = one_error_line(["compile", "--work", str(tmp_path), "--toolchain", str(missing)])
    assert "[red]toolchain holds no model_transform.py" in output


def test_cluster_shared_dir_needs_a_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("LVB_CLUSTER", raising=False)
    output = one_error_line(["compile", "--work", str(tmp_path), "--cluster-shared-dir", str(tmp_path)])
    assert "--cluster-shared-dir needs --cluster" in output


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.toolchain
def test_doctor_with_a_broken_toolchain_names_the_tool(tmp_path):
    """A toolchain whose model_transform.py fails: doctor reports that tool, exit 1."""
    real = find_toolchain()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("model_deploy.py", "model_tool"):
        (bin_dir / tool).symlink_to(real.tool(tool))
    executable(bin_dir / "python", f'#!/bin/sh\nexec {real.python} "$@"\n')
    executable(bin_dir / "model_transform.py", "#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    result = runner.invoke(app, ["doctor", "--toolchain", str(tmp_path)])
    assert result.exit_code == 1
    assert "model_transform.py failed" in result.output


@pytest.mark.toolchain
def test_doctor_proves_the_real_toolchain(monkeypatch):
    """The real thing: compile W4BF16, run on the simulator, compare with onnxruntime."""
    monkeypatch.delenv("LVB_TOOLCHAIN", raising=False)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "toolchain works" in result.output
    printed = float(re.search(r"cosine (\d\.\d+)", result.output).group(1))
    assert printed >= DOCTOR_MIN_COSINE > 0.9999  # the threshold itself is tight, not just met


@pytest.mark.parametrize("chunk, problem", [("16,abc", "comma-separated list"), ("8,4096", "between 1 and --seq")])
def test_export_names_a_bad_chunk_list(chunk, problem, checkpoint_factory, tmp_path):
    from helpers import one_error_line

    output = one_error_line(["export", "--model", str(checkpoint_factory("mha-cross-first")), "--out", str(tmp_path),
                             "--seq", "160", "--chunk", chunk])
    assert problem in output and not (tmp_path / "export" / "manifest.json").exists()


BAD_CHOICES = {  # every choice option, refused in lvb's one style before any work: one line, exit 1
    "compile --check": (["compile", "--work", "{tmp}", "--check", "foo"], "--check foo is not one of all, kinds, none"),
    "compile --quant": (["compile", "--work", "{tmp}", "--quant", "int3"], "--quant int3 is not one of int4, int8, bf16, w8a8"),
    "compile --head-quant": (["compile", "--work", "{tmp}", "--head-quant", "fp8"], "--head-quant fp8 is not one of int4, int8, bf16, w8a8"),
    "compile --quant w8a8": (["compile", "--work", "{tmp}", "--quant", "w8a8"], "--quant w8a8 is for --vision-quant only"),
    "compile --calibration-images": (["compile", "--work", "{tmp}", "--calibration-images", "{tmp}"],
                                     "--calibration-images is for --vision-quant w8a8"),
    "compile --no-calibration-tuning": (["compile", "--work", "{tmp}", "--no-calibration-tuning"],
                                        "--no-calibration-tuning is for --vision-quant w8a8"),
    "compile --chip": (["compile", "--work", "{tmp}", "--chip", "bm1688"], "--chip bm1688 is not one of bm1684x"),
    "compile --jobs (not a number)": (["compile", "--work", "{tmp}", "--jobs", "two"], "--jobs two:"),
    "pack --quant": (["pack", "{tmp}", "--out", "{tmp}/package", "--quant", "banana"], "--quant banana is not one of int4, int8, bf16, w8a8"),
    "verify --backend": (["verify", "--model", "{tmp}", "--work", "{tmp}", "--backend", "tpu"],
                         "--backend tpu is not one of cmodel, sail, onnxruntime"),
    "verify --pictures": (["verify", "--model", "{tmp}/no-model", "--work", "{tmp}", "--pictures", "0"], "--pictures 0 is out of range"),
    "run --backend": (["run", "--model", "{tmp}", "--prompt", "hi", "--backend", "tpu"], "--backend tpu is not one of"),
    "serve --history": (["serve", "--model", "{tmp}", "--history", "forever"], "--history forever is not one of refuse, truncate"),
}


@pytest.mark.parametrize("case", BAD_CHOICES)
def test_a_bad_choice_is_one_line_and_exit_1(case, tmp_path):
    args, expected = BAD_CHOICES[case]
    output = one_error_line([a.format(tmp=tmp_path) for a in args])
    assert expected in output and "Usage:" not in output
    assert not list(tmp_path.iterdir())  # nothing started


def test_the_library_refuses_a_bad_choice_in_the_same_words():
    """CompileSettings, open_engine, pack and verify take names from callers other than the CLI."""
    from lvb.compile.compiler import CompileSettings
    from lvb.contract import ChoiceError, Quant
    from lvb.runtime.backends import open_engine

    with pytest.raises(ChoiceError, match="^--vision-quant f32 is not one of int4, int8, bf16, w8a8$"):
        CompileSettings(quant="int4", vision_quant="f32")
    with pytest.raises(ChoiceError, match="^--backend tpu is not one of cmodel, sail, onnxruntime$"):
        open_engine("tpu")
    settings = CompileSettings(quant="int8", check="kinds")  # names from a manifest become the choices
    assert settings.quant is Quant.INT8 and f"{settings.quant}" == "int8" and {"int8": 1}[settings.quant] == 1
