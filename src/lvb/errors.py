"""The base of every error that means "bad input or environment".

The CLI prints these as one line naming the problem and the fix, and exits 1;
anything else is a bug and keeps its traceback. No dependencies: the lean
runtime raises these too.
"""


class LvbError(Exception):
    pass
