"""The torch.distributed section of reports/scale.md: ranks.py measures it (reports/scale_ranks.md)
and attaches it; scale.py attaches it again when it rewrites scale.md. A support module for both:
it measures nothing and writes no report of its own."""

from __future__ import annotations

from pathlib import Path

SCALE_MD = Path(__file__).resolve().parents[1] / "reports" / "scale.md"
SECTION = "## Several processes (torch.distributed)"


def attach(ranks_md: Path, scale_md: Path = SCALE_MD) -> None:
    """The ranks report as the last section of `scale_md` (replacing an earlier one); nothing when
    either file is missing."""
    if not ranks_md.is_file() or not scale_md.is_file():
        return
    body = ranks_md.read_text().split("\n", 1)[1].strip()  # without its own title
    text = scale_md.read_text().split(f"\n{SECTION}\n", 1)[0].rstrip()
    scale_md.write_text(f"{text}\n\n{SECTION}\n\n{body}\n(From [scale_ranks.md](scale_ranks.md), `python benchmarks/ranks.py`.)\n")
