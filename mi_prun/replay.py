"""A recorded decision (pruning.json) read back as a plan: replayed with --plan on the same model
or on another quantization of it, refused before any weights load where it does not fit."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError

class Replay(BaseModel):
    """A decision taken by an earlier run, applied again instead of scoring."""

    model_config = ConfigDict(frozen=True)

    manifest: str  # the pruning.json it came from
    removed: list[int]
    architecture: str
    blocks_before: int
    # Config values that fix every tensor shape (hidden size, heads, ...): a plan made on one
    # model is refused on a model of other shapes, before any weights load.
    shapes: dict[str, int] = Field(default_factory=dict)


# Config keys whose values fix the tensor shapes a replayed decision must find again.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def shapes_of(config: dict) -> dict[str, int]:
    return {k: int(config[k]) for k in SHAPE_KEYS if isinstance(config.get(k), int)}


def read_replay(path: Path) -> tuple[dict, Replay]:
    """The recorded plan (as a dict of choices) and the decision of a pruning.json (or of the
    folder holding one); one clear line for anything unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "pruning.json"
    if not path.is_file():
        raise UserError(f"plan file {path} does not exist: give a pruning.json written by mi-prun-edge")
    try:
        data = json.loads(path.read_text())
        replay = Replay(
            manifest=str(path.resolve()), removed=data["removed"], architecture=data["architecture"],
            blocks_before=data["blocks_before"], shapes=data.get("shapes", {}),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as err:
        raise UserError(f"{path} is not a pruning.json of mi-prun-edge ({type(err).__name__}: {err})") from None
    return dict(data.get("plan") or {}), replay


def check_replay(replay: Replay, architecture: str, n_blocks: int, config: dict) -> None:
    """Refuse a recorded decision on a model it does not fit (before any weights load)."""
    where = f"the plan {replay.manifest}"
    if replay.architecture != architecture:
        raise UserError(f"{where} was made for a {replay.architecture} model, not {architecture}")
    if replay.blocks_before != n_blocks:
        raise UserError(f"{where} was made for {replay.blocks_before} blocks; this model has {n_blocks}")
    shapes = shapes_of(config)
    differ = [f"{k} {v} (plan: {replay.shapes[k]})" for k, v in shapes.items() if k in replay.shapes and replay.shapes[k] != v]
    if differ:
        raise UserError(f"{where} does not fit this model's tensor shapes: {', '.join(differ)}")
