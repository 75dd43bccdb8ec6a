"""`python -m mi_prun` is the `mi-prun-edge` command line."""

from .cli import app

app()
