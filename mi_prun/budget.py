"""Budgets: the best measured point of a frontier that meets them (`build --max-size / --min-speedup /
--max-ppl-increase --frontier DIR`). The point shipped is the file the frontier built and measured,
so what the report says is what ships."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .atomic import atomic_dir
from .errors import UserError
from .frontier import FRONTIER_JSON, Frontier, FrontierPoint
from .manifest import MANIFEST_NAME, PruningManifest
from .plan import validation_line

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
BUDGET_JSON = "budget.json"


def parse_size(text: str) -> int:
    """'64MiB', '70MB', '1.5GiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--max-size {text!r}: give a size such as 64MiB, 70MB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_fraction(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise UserError(f"--max-ppl-increase {text!r}: give a percentage such as 10% (or a fraction such as 0.1)") from None


class Budget(BaseModel):
    max_bytes: int | None = None
    min_speedup: float | None = None  # decode tokens/s over the model as given
    max_ppl_increase: float | None = None  # perplexity on the frontier's first text over the model as given, minus 1

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.max_bytes, self.min_speedup, self.max_ppl_increase))

    def misses(self, p: FrontierPoint) -> list[str]:
        out = []
        if self.max_bytes is not None and p.bytes > self.max_bytes:
            out.append(f"{p.bytes / 2**20:.1f} MiB > {self.max_bytes / 2**20:.1f} MiB")
        if self.min_speedup is not None and p.speedup < self.min_speedup:
            out.append(f"speedup {p.speedup:.2f}x < {self.min_speedup:.2f}x")
        if self.max_ppl_increase is not None and p.ppl_increase > self.max_ppl_increase:
            out.append(f"perplexity +{p.ppl_increase:.1%} > +{self.max_ppl_increase:.1%}")
        return out


def read_frontier(folder: Path) -> Frontier:
    path = Path(folder) / FRONTIER_JSON
    if not path.is_file():
        raise UserError(f"{folder} holds no {FRONTIER_JSON}: measure one first (mi-prun-edge frontier --out {folder} --eval TEXT)")
    try:
        return Frontier.model_validate_json(path.read_text())
    except ValidationError as err:
        raise UserError(f"{path} is not a frontier written by mi-prun-edge ({validation_line(err)}): measure it again") from None


def pick(frontier: Frontier, budget: Budget) -> tuple[FrontierPoint, list[str]]:
    """The point with the lowest perplexity (then the smallest file) among those that meet every
    budget, and the lines that say why."""
    points = frontier.points
    fits = [p for p in points if not budget.misses(p)]
    if not fits:
        closest = min(points, key=lambda p: len(budget.misses(p)))
        raise UserError(f"no measured point meets the budget (closest: {closest.label}, {'; '.join(budget.misses(closest))}); "
                        "relax it, or measure more points (frontier --remove / --gguf-types)")
    best = min(fits, key=lambda p: (p.ppl_primary, p.bytes))
    why = [f"picked {best.label}: {best.bytes / 2**20:.1f} MiB, decode {best.speedup:.2f}x {frontier.reference}, "
           f"perplexity {best.ppl_primary:.2f} (+{best.ppl_increase:.1%}) on {frontier.primary_text}: the lowest "
           f"perplexity of the {len(fits)} of {len(points)} measured points that meet the budget"]
    if best.removed_blocks == 0:
        why.append("no block is removed: under this budget a quantization of the whole model beats every pruned point")
    return best, why


def ship(frontier_dir: Path, frontier: Frontier, point: FrontierPoint, why: list[str], budget: Budget, out: Path, force: bool) -> Path:
    """Copy the picked point's GGUF or ONNX folder (and, for a pruned point, its pruning.json, and
    the build's model card when the point is the build's own export, which the card describes) into `out`."""
    src = Path(point.file)
    src = src if src.is_absolute() else Path(frontier_dir) / src
    if not src.exists():
        raise UserError(f"{src} is gone from the frontier folder: measure the frontier again")
    with atomic_dir(out, force) as tmp:
        if src.is_dir():  # an ONNX export: shipped as `onnx/`, where the model card points
            shutil.copytree(src, tmp / "onnx")
        else:
            shutil.copy2(src, tmp / src.name)
        if point.removed_blocks > 0 and (src.parent / MANIFEST_NAME).is_file():
            shutil.copy2(src.parent / MANIFEST_NAME, tmp / MANIFEST_NAME)
            [export] = PruningManifest.read(src.parent).exports
            if export.file == src.name and (src.parent / "README.md").is_file():
                shutil.copy2(src.parent / "README.md", tmp / "README.md")
        (tmp / BUDGET_JSON).write_text(json.dumps({
            "frontier": str(Path(frontier_dir).resolve()), "budget": budget.model_dump(), "picked": point.model_dump(), "why": why,
        }, indent=2, default=str) + "\n")
    return out / ("onnx" if src.is_dir() else src.name)
