"""`python -m lvb`: the `lvb` command."""

from lvb.cli import app

app(prog_name="lvb")
