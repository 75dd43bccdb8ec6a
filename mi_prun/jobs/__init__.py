"""The jobs: one function per command, each owning a run from plan to result.

A job checks its plan before any weights load (preflight), loads the model as the plan says, runs
the stages (`pipeline`), writes its output folder at once, and returns an immutable result
(`results`). The command line only turns options into a plan, calls a job and prints what it
returns; benchmarks call the jobs too, so every number comes from the product's own path.
"""

from .build import build, ship_budget
from .evaluate import evaluate
from .export import export
from .frontier import frontier
from .heal import heal
from .prune import prune
from .results import Evaluated, Exported, Scored, Shipped, Written
from .score import score

__all__ = ["build", "ship_budget", "evaluate", "export", "frontier", "heal", "prune", "score",
           "Evaluated", "Exported", "Scored", "Shipped", "Written"]
