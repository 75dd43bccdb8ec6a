"""One runtime in its own process: timing (all model variants loaded, alternating) or peak memory (one model).

    python benchmarks/latency_worker.py time   --runtime llama.cpp --models A B C --repeats 5 --threads 2
    python benchmarks/latency_worker.py memory --runtime ort-genai --models A --threads 2

Prints one JSON object on stdout. Decoding is greedy with the runtime's own KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mi_prun.runtimes.llamacpp import timing_prompt as prompt_tokens  # the frontier times with the same ids

PROMPT_LENGTHS = (128, 512)


class TorchRuntime:
    name = "torch"

    def __init__(self, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size

    def prefill(self, tokens):
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(input_ids=self.torch.tensor([tokens]), use_cache=True)
            return time.perf_counter() - t0

    def generate(self, tokens, n):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.tensor([tokens]), use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t_first = time.perf_counter()
            past = out.past_key_values
            for _ in range(n - 1):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t_end = time.perf_counter()
        return t_first - t0, (n - 1) / (t_end - t_first)


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp

        # use_mmap=False: the weights are read into the process, so peak RSS counts them whole.
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, use_mmap=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def prefill(self, tokens):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def generate(self, tokens, n):
        self.llm.reset()
        t0 = time.perf_counter()
        t_first = None
        for i, _tok in enumerate(self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True)):
            if i == 0:
                t_first = time.perf_counter()
            if i == n - 1:
                break
        t_end = time.perf_counter()
        return t_first - t0, (n - 1) / (t_end - t_first)


class OrtGenaiRuntime:
    name = "ort-genai"

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.vocab = json.load(open(os.path.join(path, "genai_config.json")))["model"]["vocab_size"]

    def new_generator(self, length):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        return self.og.Generator(self.model, params)

    def prefill(self, tokens):
        g = self.new_generator(len(tokens) + 1)
        t0 = time.perf_counter()
        g.append_tokens(tokens)
        return time.perf_counter() - t0

    def generate(self, tokens, n):
        g = self.new_generator(len(tokens) + n)
        t0 = time.perf_counter()
        g.append_tokens(tokens)
        g.generate_next_token()
        g.get_next_tokens()
        t_first = time.perf_counter()
        for _ in range(n - 1):
            g.generate_next_token()
        g.get_next_tokens()
        t_end = time.perf_counter()
        return t_first - t0, (n - 1) / (t_end - t_first)


RUNTIMES = {r.name: r for r in (TorchRuntime, LlamaCppRuntime, OrtGenaiRuntime)}


def measure_once(rt, decode_tokens: int) -> dict:
    out = {}
    for n in PROMPT_LENGTHS:
        out[f"prefill_{n}_s"] = rt.prefill(prompt_tokens(n, rt.vocab))
    ttft, tps = rt.generate(prompt_tokens(128, rt.vocab, seed=1), decode_tokens)
    out["ttft_s"], out["decode_tok_s"] = ttft, tps
    return out


def run_timing(args) -> dict:
    runtimes = [RUNTIMES[args.runtime](path, args.threads) for path in args.models]
    for rt in runtimes:  # warm-up: first calls allocate caches and pick kernels
        rt.prefill(prompt_tokens(128, rt.vocab))
        rt.generate(prompt_tokens(32, rt.vocab), 8)
    runs = {path: [] for path in args.models}
    for _ in range(args.repeats):
        for path, rt in zip(args.models, runtimes):  # alternating: dense, pruned, ..., dense, pruned, ...
            runs[path].append(measure_once(rt, args.decode_tokens))
    return {"runtime": args.runtime, "threads": args.threads, "runs": runs}


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return status_mib("VmRSS")


def run_memory(args) -> dict:
    RUNTIMES[args.runtime]  # import nothing heavy before the baseline
    base = rss_mib()
    rt = RUNTIMES[args.runtime](args.models[0], args.threads)
    loaded = rss_mib()
    rt.prefill(prompt_tokens(512, rt.vocab))
    rt.generate(prompt_tokens(128, rt.vocab), 16)
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a worker started
    # by a large parent would report the parent's peak.
    peak = status_mib("VmHWM")
    return {"runtime": args.runtime, "model": args.models[0], "base_rss_mib": base, "after_load_rss_mib": loaded, "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["time", "memory"])
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    result = run_timing(args) if args.mode == "time" else run_memory(args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
