"""Print one optional-dependency group of pyproject.toml, one requirement per line.

The Makefile installs .venv-tpu from the `toolchain` group without installing
lvb's own dependencies there, so the pins stay in pyproject.toml alone.
"""

import sys
import tomllib
from pathlib import Path

group = sys.argv[1]
pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
print("\n".join(pyproject["project"]["optional-dependencies"][group]))
