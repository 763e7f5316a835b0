"""`lvb serve`: the chat runtime behind an OpenAI-compatible HTTP API and a web page.

Needs the `serve` extra (FastAPI, uvicorn); the lean runtime never imports this package.
"""
