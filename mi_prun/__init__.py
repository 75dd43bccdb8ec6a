"""mi-prun-edge: remove redundant transformer blocks with MI-PRUN and ship the result to edge runtimes."""

__version__ = "0.1.0"
