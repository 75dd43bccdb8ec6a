"""The block runner: everything that executes the model passes through here.

It runs token windows block by block (block-major: each block is fetched once per pass, which is
what lets a streamed model hold one block at a time), with the masks and rotary embeddings the
whole model would give each block. Those are not re-implemented: a pass of the model's own
forward with every block replaced by a recording stand-in captures, per block, the exact keyword
arguments the model's loop hands it (sliding-window masks and per-layer rope included), and the
embeddings it starts from. Dense boundary states are cached per window set, so any later pass
(a proposal, a compensation fit) starts at the first block it changes.

Boundary b is the state entering block b (b = 0 .. n-1) or leaving the last block (b = n),
before the final norm.
"""

from __future__ import annotations

import itertools
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .archs import ArchSpec, blocks, get_path, set_path
from .capture import block_output
from .linear_attention import linear_in
from .profile import PROFILE, Part
from .weights import BlockStore, available_memory

# Rows of logits computed at once: memory is rows x vocabulary (262k for Gemma 3).
LOGIT_ROWS = 256


class _Stop(Exception):
    """Raised by the last stand-in: nothing after the blocks is needed."""


class _StandIn(nn.Module):
    """Takes a block's place for one forward: records its arguments, passes the state through."""

    def __init__(self, index: int, original: nn.Module, record: Callable[[int, torch.Tensor, dict], None], last: bool) -> None:
        super().__init__()
        self.index, self.record, self.last = index, record, last
        if hasattr(original, "attention_type"):  # some models pick the mask by the block's attribute
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("a decoder block was called with positional arguments; the runner expects keywords")
        self.record(self.index, hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class Windows:
    """Token windows (n, seq_len) and, once computed, their dense boundary states and (when a
    pass asked for them) each block's residual-projection output in the dense model.

    `index`: each window's position in the whole set, which in a distributed run is spread over
    the ranks (`distributed.share`); folds and halves are taken by it, so they are the same
    windows whatever the number of ranks."""

    ids: torch.Tensor
    dense: dict[int, torch.Tensor] = field(default_factory=dict)
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.arange(self.ids.shape[0])

    @classmethod
    def share(cls, ids: torch.Tensor) -> "Windows":
        """This rank's share of the windows `ids` (all of them in one process)."""
        rows = distributed.share(ids.shape[0])
        return cls(ids[rows], index=torch.arange(ids.shape[0])[rows])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, rows: Sequence[int] | slice | torch.Tensor) -> "Windows":
        return Windows(self.ids[rows], {b: s[rows] for b, s in self.dense.items()}, {b: s[rows] for b, s in self.taps.items()},
                       self.index[rows])

    def half(self, parity: int) -> "Windows":
        """The windows of even (0) or odd (1) position in the whole set, renumbered within the half."""
        # A slice where the windows are consecutive (a rank's share): spilled states stay views, not copies.
        consecutive = len(self) and int(self.index[-1] - self.index[0]) == len(self) - 1
        rows = slice(int(parity - self.index[0]) % 2, None, 2) if consecutive else torch.nonzero(self.index % 2 == parity).flatten()
        out = self.subset(rows)
        out.index = out.index // 2
        return out


class BlockRunner:
    def __init__(self, model: nn.Module, spec: ArchSpec, store: BlockStore, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 4) -> None:
        self.model, self.spec, self.store = model, spec, store
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.n_blocks = len(blocks(model, spec))
        self._kwargs: dict[tuple[int, int], list[dict]] = {}
        self.spill_dir: Path | None = None  # where boundary states go when RAM would not hold them
        self._spill: tempfile.TemporaryDirectory | None = None
        self._spill_names = itertools.count()
        self.spilled_bytes = 0
        self.block_runs = 0  # blocks run x windows batches, for the record
        self.rewritten: dict[str, torch.Tensor] = {}  # see `rewriting`
        self.linear_blocks: frozenset[int] = frozenset()

    # -- the model's own preparation, recorded ------------------------------------------------
    @torch.no_grad()
    def _record(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """Embeddings of `ids` and the keyword arguments each block receives, from the model's forward."""
        layers = blocks(self.model, self.spec)
        seen: dict[int, dict] = {}
        first: dict[str, torch.Tensor] = {}

        def record(index, hidden, kwargs):
            seen[index] = kwargs
            if index == 0:
                first["h"] = hidden

        stand_ins = nn.ModuleList(_StandIn(i, layer, record, i == len(layers) - 1) for i, layer in enumerate(layers))
        base = get_path(self.model, self.spec.blocks_path.rpartition(".")[0])
        set_path(self.model, self.spec.blocks_path, stand_ins)
        try:
            base(input_ids=ids.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            set_path(self.model, self.spec.blocks_path, layers)
        return first["h"], [seen[i] for i in range(len(layers))]

    def _block_kwargs(self, batch: int, seq_len: int) -> list[dict]:
        # Masks and rotary embeddings depend on the batch shape only (no padding), not the tokens.
        key = (batch, seq_len)
        if key not in self._kwargs:
            self._kwargs[key] = self._record(torch.zeros(batch, seq_len, dtype=torch.long))[1]
        return self._kwargs[key]

    def batches(self, count: int) -> Iterator[slice]:
        """Row slices of `batch_size` windows."""
        for start in range(0, count, self.batch_size):
            yield slice(start, min(start + self.batch_size, count))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Boundary 0 (what the first block receives) for every window."""
        parts = []
        for rows in self.batches(ids.shape[0]):
            hidden, kwargs = self._record(ids[rows])
            self._kwargs.setdefault((hidden.shape[0], hidden.shape[1]), kwargs)
            parts.append(hidden)
        return torch.cat(parts)

    # -- running blocks ----------------------------------------------------------------------------
    @contextmanager
    def rewriting(self, weights: dict[str, torch.Tensor], linear_attention: Iterable[int] = ()) -> Iterator[None]:
        """`weights` (parameter names of the unpruned model: healed, or read back from a pruned
        checkpoint) stand in for the source's in every block this runner runs, for the duration,
        and the blocks in `linear_attention` run their attention as their output projection alone
        (`linear_attention.py`).
        Works alike for resident and streamed blocks: they are put in place when a block is fetched."""
        saved = self.rewritten, self.linear_blocks
        self.rewritten = {**saved[0], **weights}
        self.linear_blocks = saved[1] | frozenset(linear_attention)
        try:
            yield
        finally:
            self.rewritten, self.linear_blocks = saved

    @contextmanager
    def open_block(self, index: int, weights: dict[str, torch.Tensor] | None = None
                   ) -> Iterator[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """Block `index` (original numbering) fetched, the pruned model's weights in place (`rewriting`,
        then `weights`: names inside the block), and a function applying it to a batch of states
        (windows, seq, hidden) with the masks and rotary embeddings of its place in the model; a
        block `rewriting` names as linear runs its attention as its output projection alone.
        Gradients follow the caller: healing trains through it, passes run it under no_grad."""
        inside = {}
        for name, value in self.rewritten.items():
            at = self.spec.block_of(name)
            if at is not None and at[0] == index:
                inside[at[1]] = value
        inside.update(weights or {})
        with self.store.block(index) as layer:
            saved = []
            for dotted, value in inside.items():
                param = get_path(layer, dotted)
                saved.append((param, param.data))
                param.data = value.to(param.device, param.dtype)

            def apply(states: torch.Tensor) -> torch.Tensor:
                kwargs = self._block_kwargs(states.shape[0], states.shape[1])[index]
                self.block_runs += 1
                PROFILE.block_forwards += states.shape[0]
                with PROFILE.part(Part.copy, self.device):
                    states = states.to(self.device)
                with PROFILE.part(Part.forward, self.device):
                    return block_output(layer(states, **kwargs))

            try:
                with linear_in(layer, self.spec) if index in self.linear_blocks else nullcontext():
                    yield layer, apply
            finally:
                for param, original in saved:
                    param.data = original

    @torch.no_grad()
    def run_block(self, index: int, states: torch.Tensor, projection_weight: torch.Tensor | None = None,
                  tap: list | None = None, weights: dict[str, torch.Tensor] | None = None,
                  tap_path: str | None = None) -> torch.Tensor:
        """Block `index` (original numbering) applied to `states` (windows, seq, hidden).

        `projection_weight` replaces the block's residual projection weight for this call (a
        compensated block, as it will ship), `weights` any of its weights (names inside the block);
        `tap`, when given, receives the output of the module at `tap_path` (default: that
        projection, i.e. what the block adds to the residual stream through it), as one
        (windows, seq, hidden) tensor."""
        weights = dict(weights or {})
        if projection_weight is not None:
            weights[f"{self.spec.residual_projection}.weight"] = projection_weight
        out, taps = [], []
        with self.open_block(index, weights) as (layer, apply):
            hook = None
            if tap is not None:
                module = get_path(layer, tap_path or self.spec.residual_projection)
                hook = module.register_forward_hook(lambda _m, _i, o: taps.append(o))
            try:
                for rows in self.batches(states.shape[0]):
                    out.append(apply(states[rows]))
            finally:
                if hook is not None:
                    hook.remove()
        if tap is not None:
            tap.append(torch.cat(taps))
        return torch.cat(out)

    def run_blocks(self, indices: Sequence[int], states: torch.Tensor,
                   projection_weights: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        weights = projection_weights or {}
        for i in indices:
            states = self.run_block(i, states, weights.get(i))
        return states

    @torch.no_grad()
    def dense_pass(self, windows: Windows, keep: Callable[[int], bool] = lambda b: True,
                   on_block: Callable[[], None] | None = None, taps: bool = False, last: int | None = None) -> Windows:
        """Run the dense model over `windows`, keeping the boundary states `keep` selects (all by
        default), and with `taps` every block's residual-projection output too: in RAM, or in
        files when they would take more than a quarter of the free memory. `last`: the last
        boundary needed (default: the model's output); the blocks after it are not run."""
        last = self.n_blocks if last is None else last
        if self.rewritten:  # the cache is of the dense model: a pass with other weights must not fill it
            raise RuntimeError("a dense pass was asked for while rewritten weights are in place")
        h = self.embed(windows.ids)
        kept = sum(keep(b) for b in range(last + 1)) + (last if taps else 0)
        spill = kept * h.numel() * h.element_size() > available_memory(h.device) // 4
        if spill and self.spill_dir is None:
            self._spill = tempfile.TemporaryDirectory(prefix="mi-prun-states-")
            self.spill_dir = Path(self._spill.name)
        store = self._spilled if spill else (lambda t: t)
        for b in range(last + 1):
            if b > 0:
                tap: list | None = [] if taps else None
                h = self.run_block(b - 1, h, tap=tap)
                if taps:
                    windows.taps[b - 1] = store(tap[0])
                if on_block is not None:
                    on_block()
            if keep(b):
                windows.dense[b] = store(h)
        return windows

    def _spilled(self, states: torch.Tensor) -> torch.Tensor:
        """`states` moved to a file-backed tensor: the kernel pages it in and out as memory allows."""
        path = self.spill_dir / f"{next(self._spill_names)}.bin"
        out = torch.from_file(str(path), shared=True, size=states.numel(), dtype=states.dtype).view(states.shape)
        out.copy_(states)
        self.spilled_bytes += states.numel() * states.element_size()
        return out

    def block_bytes(self) -> int:
        """Bytes of one block's weights in the compute dtype (the blocks of a family are alike).
        Read from the module's parameter shapes: a streamed block's empty (meta) parameters know
        their size, so nothing is loaded."""
        return sum(p.numel() * p.element_size() for p in blocks(self.model, self.spec)[0].parameters())

    # -- after the last block ------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Final norm, head and any logit soft-capping, for (rows, hidden) states: (rows, vocab) float32."""
        norm = get_path(self.model, self.spec.final_norm_path)
        logits = self.model.get_output_embeddings()(norm(states.to(self.device))).float()
        cap = getattr(self.model.config, self.spec.logit_softcap_key, None) if self.spec.logit_softcap_key else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def token_rows(self, final: torch.Tensor, ids: torch.Tensor) -> Iterator[tuple[int, slice, torch.Tensor, torch.Tensor]]:
        """(window, positions, log-probs, targets) over every predicted token, LOGIT_ROWS rows at a time."""
        seq = ids.shape[1]
        for w in range(ids.shape[0]):
            for start in range(0, seq - 1, LOGIT_ROWS):
                pos = slice(start, min(start + LOGIT_ROWS, seq - 1))
                lp = F.log_softmax(self.logits(final[w, pos]), dim=-1).cpu()
                yield w, pos, lp, ids[w, pos.start + 1 : pos.stop + 1]

    def window_nll(self, final: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """This rank's summed next-token NLL (nats) per window, and the tokens each predicts, from
        final boundary states."""
        totals, counts = np.zeros(ids.shape[0]), np.zeros(ids.shape[0], dtype=np.int64)
        seq = ids.shape[1]
        with PROFILE.part(Part.head, self.device):
            self._window_nll(final, ids, totals, counts)
        return totals, counts

    def _window_nll(self, final: torch.Tensor, ids: torch.Tensor, totals: np.ndarray, counts: np.ndarray) -> None:
        seq = ids.shape[1]
        for w in range(ids.shape[0]):
            for start in range(0, seq - 1, LOGIT_ROWS):
                stop = min(start + LOGIT_ROWS, seq - 1)
                logits = self.logits(final[w, start:stop])
                targets = ids[w, start + 1 : stop + 1].to(logits.device)
                # NLL = logsumexp - target logit: no log-probability table is materialized.
                totals[w] += float((torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum())
                counts[w] += stop - start

    def nll_sum(self, final: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL (nats) and the number of predicted tokens, from final boundary
        states: over every rank's windows (each rank passes its share)."""
        totals, counts = self.window_nll(final, ids)
        total, count = distributed.all_sum([float(totals.sum()), float(counts.sum())])
        return total, int(count)
