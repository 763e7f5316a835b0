"""tpu-mlir's run_calibration.py, unchanged but for memory; runs in the toolchain's own Python.

run_calibration.py (tpu-mlir 1.30.2) loads the net into a shape-op finder and a pattern matcher
before its calibrator, each an interpreter that holds every tensor of the net at once
(force_value_mem), and keeps both alive until it exits although neither runs again. For a
vision layer at the 11B's four tiles each holds gigabytes of attention scores: three at once did
not fit a 24 GB host. Here each of the two drops its interpreter when its run() returns, and
the calibrator takes its statistics one tensor at a time (six threads each copied a tensor of
scores several times over); what the tool computes is untouched (tests/test_calibration.py
holds the tables equal).

Usage: python -m lvb.compile.calibrate_tool <run_calibration.py's arguments>
"""

from __future__ import annotations

import gc
import os
import runpy
import sys


def _freed_after_run(cls) -> None:
    run = cls.run

    def run_then_free(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        finally:
            self.module = None
            gc.collect()

    cls.run = run_then_free


def main() -> None:
    import tpu_mlir  # noqa: F401  (sets TPUC_ROOT and sys.path like the tools' entry points)
    from calibration.shape_ops import ShapeOps
    from calibration.transformer_pattern import MatchPattern

    for cls in (ShapeOps, MatchPattern):
        _freed_after_run(cls)
    import calibration.kld_calibrator as calibrator

    calibrator.POOL_THREADS = 1
    script = os.path.join(os.environ["TPUC_ROOT"], "python", "tools", "run_calibration.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
