"""llama.cpp through llama-cpp-python: load a GGUF, compute logits, quantize. Imported lazily."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mi_prun.errors import UserError

from .parity import WindowScore

INSTALL_HINT = "install llama-cpp-python (make install builds it; about 10 minutes on 2 cores)"


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"llama.cpp is needed for this step but llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return llama_cpp


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs every tensor to fd 2; keep it for errors only."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load(path: Path, n_ctx: int = 512, logits_all: bool = False, n_threads: int | None = None):
    """A GGUF in llama.cpp. `n_threads` for decode and prompt alike (None: llama-cpp-python's
    defaults, half the cores for decode and all of them for the prompt)."""
    llama_cpp = llama_cpp_module()
    try:
        with _quiet_stderr():
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
            )
    except (ValueError, RuntimeError, OSError) as err:
        raise UserError(f"llama.cpp cannot load {path}: {err}") from err


def n_layer(llm) -> int:
    return int(llama_cpp_module().llama_model_n_layer(llm.model))


def load_check(path: Path) -> dict:
    """Load a GGUF in llama.cpp and run one token through it, in a child process: the model's
    pages are the child's (a 7B file maps gigabytes), and a llama.cpp abort on a bad file is an
    error message here, not the end of this process. Returns the layers llama.cpp sees and the
    child's peak resident memory."""
    import subprocess
    import sys

    llama_cpp_module()
    code = (
        "import json, resource, sys\n"
        "from mi_prun.runtimes import llamacpp\n"
        "try:\n"
        "    llm = llamacpp.load(sys.argv[1], n_ctx=64)\n"
        "    n = llamacpp.n_layer(llm)\n"
        "    llm.eval(llm.tokenize(b'Hello', add_bos=True))\n"
        "    llm.close()\n"
        "except Exception as err:\n"
        "    print(str(err).splitlines()[0] if str(err) else type(err).__name__)\n"
        "    sys.exit(1)\n"
        # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's pages.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "peak = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'layers': n, 'peak_rss_kib': peak}))\n"
    )
    root = Path(__file__).resolve().parents[2]  # the folder holding mi_prun
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [l for l in done.stdout.strip().splitlines() if l.strip()]
        # A message from the child, else llama.cpp died (an abort on a malformed file): say so.
        raise UserError(lines[-1] if lines else f"llama.cpp cannot load {path}: it exited with status {done.returncode}")
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def logits(path: Path, tokens: Sequence[int], n_threads: int | None = None) -> np.ndarray:
    """(len(tokens), vocab) float32 logits of llama.cpp for every position of one sequence."""
    llm = load(path, n_ctx=max(64, len(tokens)), logits_all=True, n_threads=n_threads)
    try:
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's own tokenization of `text` (no BOS, specials as text), vocabulary only."""
    llama_cpp = llama_cpp_module()
    with _quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def quantize(source: Path, output: Path, ftype_name: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (`llama-quantize`): `ftype_name` such as LLAMA_FTYPE_MOSTLY_Q4_0."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    # Pruning an already quantized GGUF into another type goes through dequantization.
    params.allow_requantize = True
    with _quiet_stderr():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if status != 0:
        raise UserError(f"llama.cpp failed to quantize {source} to {ftype_name} (status {status})")


def perplexity(path: Path, windows: np.ndarray, n_threads: int | None = None) -> float:
    """Perplexity of a GGUF in llama.cpp over token windows (n, seq_len), every token but each
    window's first predicted (the same windows and count as onnx_perplexity and the torch eval)."""
    return compare(path, windows, n_threads=n_threads)["ppl"]


def compare(path: Path, windows: np.ndarray, reference: Path | None = None, kl_windows: int | None = None,
            n_threads: int | None = None) -> dict:
    """llama.cpp perplexity of a GGUF over token windows (n, seq_len); with a reference GGUF (the
    dense model), also KL(reference || model) and top-1 agreement per predicted token, over the
    first `kl_windows` windows (all by default). Both models run in llama.cpp, window by window."""
    windows = np.asarray(windows)
    n_ctx = max(64, windows.shape[1])
    kl_windows = len(windows) if kl_windows is None else min(kl_windows, len(windows))
    llm = load(path, n_ctx=n_ctx, logits_all=True, n_threads=n_threads)
    ref = load(reference, n_ctx=n_ctx, logits_all=True, n_threads=n_threads) if reference is not None else None
    score = WindowScore()
    try:
        for i, window in enumerate(windows):
            llm.reset()
            llm.eval(window.tolist())
            theirs = None
            if ref is not None and i < kl_windows:
                ref.reset()
                ref.eval(window.tolist())
                theirs = ref.scores
            score.add(window, llm.scores, theirs)
    finally:
        llm.close()
        if ref is not None:
            ref.close()
    return score.result()


def kv_cache_bytes(path: Path, context: int = 2048) -> int:
    """Bytes llama.cpp keeps for `context` tokens of one sequence: the size of its saved state
    after `context` tokens less after one (the rest of the state, the last logits, is the same):
    the K and V rows of every layer that keeps attention, and a few bytes per token of llama.cpp's
    cell bookkeeping. A layer without attention keeps nothing."""
    llama_cpp = llama_cpp_module()
    llm = load(path, n_ctx=context)
    try:
        sizes = []
        for n in (1, context):
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            llm.eval(timing_prompt(n, llm.n_vocab()))
            sizes.append(int(llama_cpp.llama_state_get_size(llm.ctx)))
        return round((sizes[1] - sizes[0]) * context / (context - 1))
    finally:
        llm.close()


def timing_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    """`n` token ids for timing a runtime (benchmarks/latency_worker.py uses them too).
    Timing does not depend on which ids; ids from a fixed text would need each model's tokenizer."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 30000), size=n).tolist()


def speeds(paths: Sequence[Path], repeats: int = 3, prompt: int = 128, decode: int = 64,
           n_threads: int | None = None, on_round=None) -> list[dict]:
    """Prefill time of a `prompt`-token prompt and greedy decode speed over `decode` tokens, for
    every GGUF, measured side by side: all are loaded, warmed up, then timed in turn, round after
    round (a drift in the machine's speed then touches every model alike). Per model: each
    round's prefill_ms and decode_tok_s."""
    import time

    models = [load(p, n_ctx=prompt + decode + 8, n_threads=n_threads) for p in paths]
    runs = [{"prefill_ms": [], "decode_tok_s": []} for _ in paths]
    try:
        for llm in models:  # the first calls allocate buffers and pick kernels
            llm.reset()
            llm.eval(timing_prompt(32, llm.n_vocab(), 1))
        for r in range(repeats):
            for llm, run in zip(models, runs):
                tokens = timing_prompt(prompt, llm.n_vocab(), r)
                llm.reset()
                start = time.perf_counter()
                llm.eval(tokens)
                run["prefill_ms"].append(1000 * (time.perf_counter() - start))
                llm.reset()
                for i, _ in enumerate(llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True)):
                    if i == 0:
                        first = time.perf_counter()  # the prompt is done: decoding starts
                    if i == decode:
                        break
                run["decode_tok_s"].append(decode / (time.perf_counter() - first))
            if on_round is not None:
                on_round()
    finally:
        for llm in models:
            llm.close()
    return runs
