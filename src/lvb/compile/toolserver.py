"""A fork server for tpu-mlir's Python tools; runs in the toolchain's own Python.

model_transform.py spends ~6 s importing (its ONNX front end pulls in torch
and transformers) before a small net's ~1 s of work. This process imports
that once, then forks a child per request that runs the tool's __main__ with
the request's argv, working directory and log, exactly as the tool's own
command line would, but from warm imports.

Protocol: one JSON line in ({"script", "argv", "cwd", "log"}), one JSON line
out ({"code": exit code}).
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def _preload() -> None:
    import tpu_mlir  # noqa: F401  (sets TPUC_ROOT, PATH and sys.path like the tools' entry points)
    import transform.OnnxConverter  # noqa: F401
    from tools import model_deploy  # noqa: F401


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent goes, so a killed `lvb compile`
    does not leave tools running into its next run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(request: dict) -> None:
    code = 1
    _die_with_parent()
    try:
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.argv = [request["script"], *request["argv"]]
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # the tool's own traceback goes to its log
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
