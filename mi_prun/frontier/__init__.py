"""The prune x quantize frontier: which model to ship, measured.

Every combination of blocks removed (each pruned point made by `build`, healed as well where asked,
and built with `--granularity sublayer` as a deci GGUF where asked)
and type is measured side by side in the runtime that ships it: for `--target gguf`, llama.cpp
types made by llama.cpp's own quantizer from each build, measured in llama.cpp; for `--target
onnx`, fp32 and int4 exports by onnxruntime-genai's model builder, measured in onnxruntime
(quality) and onnxruntime-genai (speed). Measured: held-out perplexity, KL and top-1 agreement to
the reference (the model as given; for ONNX the unpruned model's fp32 export), size, prefill time
and decode speed; in llama.cpp also the KV cache and decode speed at a long context (2048
tokens). A point is on a front when no other point is at least as good on both axes and
better on one. `build --max-size / --min-speedup / --max-ppl-increase` pick from it (`budget.py`).

`points` holds the plan and the measured points (torch-free), `measure` makes and measures them,
`report` writes them; the run itself is `jobs.frontier`.
"""

from .points import (DEFAULT_RATIOS, DEFAULT_TYPES, FRONTIER_JSON, ONNX_TYPES, Frontier, FrontierPlan,  # noqa: F401
                     FrontierPoint, pareto, point_name, with_fronts)
