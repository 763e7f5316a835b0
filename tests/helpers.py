"""What several test files share: the compiled shapes of the fixtures, the CLI's
one-line errors, a way to break an exported net (and make the export believe in it), and how to
compare compiled bmodels."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from typer.testing import CliRunner

# The trained toy (models/toy).
TOY = Path(__file__).resolve().parent.parent / "models" / "toy"
# Small enough for the simulator, long enough for a few turns with an image.
SEQ, CHUNK = 160, 32
# One fixture is exported with two prefill chunk sizes, so that every test over the fixtures
# (onnxruntime parity, compile and simulator checks) also covers nets with stages.
CHUNKS = {"mha-cross-first": (CHUNK, 8), "llama-gqa2-tied": (CHUNK, 8)}


def chunks_of(name: str) -> tuple[int, ...]:
    """The prefill chunk sizes a fixture is exported with, largest first."""
    return CHUNKS.get(name, (CHUNK,))

runner = CliRunner()


def one_error_line(args: list) -> str:
    """Run `lvb ARGS` (paths and numbers taken as text), which must fail with exit 1 and
    exactly one `error:` line and no traceback; returns the whole output."""
    from lvb.cli import app

    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1, result.output
    return result.output


def scale_weights(path: Path, factor: float = 1.5) -> None:
    """Multiply every 2-D float weight of an ONNX file by `factor`: a net that computes
    something else, for the checks to catch."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(path))


# The toy's task on the simulator, fresh pictures per quantization: a picture costs about 13 s
# there (CI's largest single cost), so INT4, the coarsest quantization, answers 50 and INT8
# (finer weights, the same nets and runtime) 20. `make demo` verifies 100.
PIPELINE_PICTURES = {"int4": 50, "int8": 20}
# The INT8 run's vision tower is also INT8 in its activations (--vision-quant w8a8, calibrated):
# the one end-to-end run of that option, answers and task included, at no extra compile.
PIPELINE_VISION_QUANT = {"int4": "bf16", "int8": "w8a8"}


_BUILD_TIME = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")


def bmodel_digest(path: Path) -> str:
    """The bmodel's bytes without its build time, the one thing two identical compiles differ in."""
    data = path.read_bytes()
    return hashlib.sha256(_BUILD_TIME.sub(b"", data[:65536], count=1) + data[65536:]).hexdigest()


def manifest(bmodel: Path) -> dict:
    """The compile manifest of a combined bmodel."""
    return json.loads((bmodel.parent / "compile" / f"{bmodel.stem}.json").read_text())


def record_as_exported(work: Path, net: str) -> None:
    """Record a changed net folder's files in the export manifest, as if the export had written
    them: a wrong net the later stages trust (an unrecorded change is refused up front)."""
    import json

    from lvb.workdir import WorkDir, record_file

    directory = WorkDir(work)
    manifest = json.loads(directory.export_manifest.read_text())
    manifest["nets"][net]["files"] = {p.name: record_file(p) for p in sorted(directory.net_dir(net).iterdir())}
    directory.export_manifest.write_text(json.dumps(manifest))
