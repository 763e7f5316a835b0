from lvb.cli import app

app(prog_name="lvb")
