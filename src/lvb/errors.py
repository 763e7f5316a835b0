"""The base of every error that means "bad input or environment".

The CLI prints these as one line naming the problem and the fix, and exits 1;
anything else is a bug and keeps its traceback. No dependencies: the lean
runtime raises these too.
"""


class LvbError(Exception):
    pass


class CompileError(LvbError, RuntimeError):
    """A compile that cannot go on; the message names the net or setting. Here, not in
    lvb.compile.build, so that the compile's helpers (the calibration) raise it too."""
