"""Finding and running tpu-mlir, which lives in its own Python 3.10 environment.

Search order: an explicit setting (--toolchain, then LVB_TOOLCHAIN), then the
project's .venv-tpu, then tpu-mlir's tools on PATH (Sophgo's tpuc_dev docker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import lvb
from lvb.errors import LvbError

TOOLCHAIN_ENV = "LVB_TOOLCHAIN"
TRANSFORM = "model_transform.py"
SETUP_HINT = "run `make setup`, or point --toolchain / LVB_TOOLCHAIN at a tpu-mlir environment"
# tpu-mlir's wheel bundles Ubuntu 22.04's glibc in tpu_mlir/lib/third_party, which breaks
# against a newer host's; `make setup` deletes these (`python -m lvb.toolchain` lists them)
# and `lvb doctor` reports any that remain.
BUNDLED_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0")


# Tools running right now, so that a failed or interrupted compile can stop them all.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


class ToolchainError(LvbError, RuntimeError):
    """The toolchain is missing, broken or failed; the message says what to do."""


def repo_root() -> Path | None:
    """The source checkout lvb runs from, when it is installed editable."""
    root = Path(lvb.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


# Printed as JSON by the toolchain's own Python; must run on Python 3.10 without lvb.
_PROBE = r"""
import json, os, sys
from importlib import metadata
versions = {"python": sys.version.split()[0]}
for name in ("tpu_mlir", "torch", "transformers", "onnx", "onnxruntime", "numpy", "psutil"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
root = None
try:
    import importlib.util
    spec = importlib.util.find_spec("tpu_mlir")
    if spec and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
except Exception:
    pass
print(json.dumps({"versions": versions, "tpu_mlir_root": root or os.environ.get("TPUC_ROOT")}))
"""


@dataclass(frozen=True)
class Toolchain:
    bin_dir: Path  # holds model_transform.py, model_deploy.py, model_tool
    python: Path  # the Python that imports tpu-mlir (runs the simulator)
    source: str  # how it was found, for `lvb doctor`

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @cached_property
    def probe(self) -> dict:
        try:
            out = subprocess.run(
                [str(self.python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
            ).stdout
            return json.loads(out.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
            raise ToolchainError(f"the toolchain's Python {self.python} does not run ({e}); {SETUP_HINT}") from e

    @property
    def versions(self) -> dict[str, str | None]:
        return self.probe["versions"]

    @property
    def tpu_mlir_version(self) -> str:
        return self.versions.get("tpu_mlir") or "unknown"

    @property
    def library_dirs(self) -> list[Path]:
        """What pyruntime_bm needs on LD_LIBRARY_PATH before its process starts."""
        root = self.probe.get("tpu_mlir_root")
        if not root:
            return []
        root = Path(root)
        return [root / "lib", root / "lib" / "capi", root / "lib" / "third_party"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def run(self, args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None, name: str = "") -> None:
        """Run one tool with its output appended to `log`; raise naming the tool (`name`, else its
        program's) and the log's last lines."""
        with open(log, "a") as out:
            out.write(f"$ {' '.join(args)}\n")
            out.flush()
            # Its own process group: the tools start helpers of their own, and kill_all must reach them.
            process = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env or self.env(), start_new_session=True)
            with _LIVE_LOCK:
                _LIVE.add(process)
            try:
                code = process.wait()
            finally:
                with _LIVE_LOCK:
                    _LIVE.discard(process)
        if code != 0:
            raise ToolFailed(name or Path(args[0]).name, code, log)

    def python_tool(self, tool: str, args: list[str], cwd: Path, log: Path, server: ToolServer | None = None) -> None:
        """Run model_transform.py or model_deploy.py, from a warm ToolServer when given one."""
        if server is not None:
            server.run(tool, args, cwd, log)
        else:
            self.run([str(self.tool(tool)), *args], cwd, log)

    def lvb_command(self, module: str, args: list[str]) -> list[str]:
        """The command line of one of lvb's own tools that runs in the toolchain's Python (with worker_env)."""
        return [str(self.python), "-m", module, *args]

    def lvb_tool(self, module: str, args: list[str], cwd: Path, log: Path) -> None:
        """Run lvb_command(module, args), as run."""
        self.run(self.lvb_command(module, args), cwd, log, self.worker_env(), name=module)

    def worker_env(self) -> dict[str, str]:
        """For our own processes in the toolchain's Python: tpu-mlir's libraries must be on
        LD_LIBRARY_PATH when the process starts, and lvb's lean modules importable."""
        env = self.env()
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.library_dirs), env.get("LD_LIBRARY_PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join([str(Path(lvb.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        return env

    @staticmethod
    def kill_all() -> None:
        with _LIVE_LOCK:
            for process in _LIVE:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class ToolFailed(ToolchainError):
    def __init__(self, tool: str, code: int, log: Path):
        self.tool, self.code, self.log = tool, code, log
        super().__init__(f"{tool} exited with {code}; see {log}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _from_path(path: Path, source: str) -> Toolchain:
    """A venv (bin/python + bin/model_transform.py) or a folder holding the tools."""
    path = path.expanduser()
    for bin_dir in (path / "bin", path):
        if (bin_dir / TRANSFORM).exists():
            python = bin_dir / "python"
            if not python.exists():
                python = Path(shutil.which("python3") or sys.executable)
            return Toolchain(bin_dir=bin_dir, python=python, source=source)
    raise ToolchainError(f"{source} {path} holds no {TRANSFORM}; {SETUP_HINT}")


def find_toolchain(explicit: str | Path | None = None) -> Toolchain:
    if explicit:
        return _from_path(Path(explicit), "--toolchain")
    if os.environ.get(TOOLCHAIN_ENV):
        return _from_path(Path(os.environ[TOOLCHAIN_ENV]), TOOLCHAIN_ENV)
    for base in dict.fromkeys(p for p in (Path.cwd(), repo_root()) if p):
        venv = base / ".venv-tpu"
        if (venv / "bin" / TRANSFORM).exists():
            return _from_path(venv, ".venv-tpu")
    on_path = shutil.which(TRANSFORM)
    if on_path:
        bin_dir = Path(on_path).parent
        return Toolchain(bin_dir=bin_dir, python=Path(shutil.which("python3") or sys.executable), source="PATH")
    raise ToolchainError(f"no tpu-mlir toolchain found (no .venv-tpu, {TOOLCHAIN_ENV} unset, {TRANSFORM} not on PATH); {SETUP_HINT}")


class ToolServer:
    """tpu-mlir's Python tools run from warm imports (lvb.compile.toolserver), one at a time."""

    def __init__(self, toolchain: Toolchain):
        root = toolchain.probe.get("tpu_mlir_root")
        if not root:
            raise ToolchainError("tpu-mlir's install folder is unknown; cannot start the tool server")
        self.tools = Path(root) / "python" / "tools"
        self.process = subprocess.Popen(
            [str(toolchain.python), "-m", "lvb.compile.toolserver"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=toolchain.worker_env(), start_new_session=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(self.process)
        if not self.process.stdout.readline():
            raise ToolchainError(f"the tool server did not start in {toolchain.python}; {SETUP_HINT}")

    def run(self, tool: str, args: list[str], cwd: Path, log: Path) -> None:
        with open(log, "a") as out:
            out.write(f"$ {tool} {' '.join(args)}\n")
        request = {"script": str(self.tools / tool), "argv": args, "cwd": str(Path(cwd).resolve()), "log": str(Path(log).resolve())}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        code = json.loads(reply)["code"] if reply else -9
        if code != 0:
            raise ToolFailed(tool, code, log)

    def close(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self.process)
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


if __name__ == "__main__":
    print(" ".join(BUNDLED_GLIBC))
