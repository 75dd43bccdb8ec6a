"""What each job returns: immutable, typed, everything a caller (the CLI, a benchmark) prints or reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..manifest import ExportInfo, PruningManifest

if TYPE_CHECKING:
    from ..evaluate import EvalResult as Measured
    from ..scoring import Scores


@dataclass(frozen=True)
class Written:
    """A folder a job wrote all at once (build, prune, heal), and the manifest it holds."""

    out: Path
    manifest: PruningManifest


@dataclass(frozen=True)
class Shipped:
    """build with budgets: the frontier point that met them, copied into `out`."""

    path: Path
    why: tuple[str, ...]


@dataclass(frozen=True)
class Exported:
    out: Path
    export: ExportInfo


@dataclass(frozen=True)
class Scored:
    """score: the capture pass's scores and the blocks the plan's method would remove."""

    scores: Scores
    removed: tuple[int, ...]
    model: str  # the source, described

    def block_table(self) -> list[dict]:
        return self.scores.block_table()

    def payload(self) -> dict:
        """The scores as `score --json` writes them."""
        return {"block_scores": self.block_table(), "removed": list(self.removed),
                "runs": [r.model_dump() for r in self.scores.run_scores()]}


@dataclass(frozen=True)
class Evaluated:
    """eval: the measurement, and what it was taken on."""

    model: str
    reference: str | None
    data: str
    measured: Measured
    warnings: tuple[str, ...] = ()
    tasks: dict | None = None

    def payload(self) -> dict:
        """The results as `eval --json` writes them."""
        out = {"model": self.model, "reference": self.reference, "data": self.data, **self.measured.to_dict(),
               "warnings": list(self.warnings)}
        if self.tasks is not None:
            out["tasks"] = self.tasks
        return out
