"""The machine line and load accounting every benchmark report carries (the product's own, so a
benchmark and `mi-prun-edge frontier` judge contention the same way)."""

from mi_prun.machine import CONTENDED_SHARE, Contention, contention_line, machine_line  # noqa: F401
