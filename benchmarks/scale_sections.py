"""Sections of reports/scale.md measured by other benchmarks: torch.distributed (ranks.py,
reports/scale_ranks.md) and the default calibration size (scale_calibration.py). Each attaches
its own; scale.py attaches them again when it rewrites scale.md. A support module: it measures
nothing and writes no report of its own."""

from __future__ import annotations

from pathlib import Path

SCALE_MD = Path(__file__).resolve().parents[1] / "reports" / "scale.md"
SECTION = "## Several processes (torch.distributed)"
CALIBRATION_SECTION = "## At the default calibration size (16 x 256 tokens)"


def attach(part_md: Path, scale_md: Path = SCALE_MD, section: str = SECTION, command: str = "python benchmarks/ranks.py") -> None:
    """A report's body as a section of `scale_md`, replacing an earlier copy of that section and
    keeping the others in place (new sections go last); nothing when either file is missing."""
    if not part_md.is_file() or not scale_md.is_file():
        return
    body = part_md.read_text().split("\n", 1)[1].strip()  # without its own title
    block = f"{section}\n\n{body}\n(From [{part_md.name}]({part_md.name}), `{command}`.)\n"
    text = scale_md.read_text()
    start = text.find(f"\n{section}\n")
    if start < 0:
        scale_md.write_text(f"{text.rstrip()}\n\n{block}")
        return
    rest = text[start + 1 :]
    end = rest.find("\n## ", len(section))
    tail = "" if end < 0 else rest[end + 1 :]
    scale_md.write_text(f"{text[:start].rstrip()}\n\n{block}" + (f"\n{tail}" if tail else ""))
