"""The `mi-prun-edge` command line: a module per command; each parses, checks, calls the pipeline, prints."""

from . import build, eval, export, frontier, heal, prune, score  # noqa: F401  (each registers its command)
from .app import app

__all__ = ["app"]
