"""Declarative architecture adapters.

An adapter only *names* where things are in a Hugging Face model: the layer stacks, the final norm, the head,
the attributes that carry a layer's index and the config fields that describe depth. depthprune never re-implements
a model's forward pass; it rearranges the model's own modules and lets the model run them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """A config attribute that follows a stack's depth.

    `owner` is a dotted module path from `model.base_model` whose `.config` holds the field ("" = the model's own
    config; "encoder" = the encoder stack's private config copy, as T5 keeps one). `per_layer` marks list fields with
    one entry per layer (e.g. `layer_types`), which are reordered by the plan instead of set to the new depth.
    """

    name: str
    owner: str = ""
    per_layer: bool = False


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """One stack of layers that a plan can rearrange.

    Paths are relative to `model.base_model` (the backbone every head class of a family shares: `LlamaModel` inside
    `LlamaForCausalLM`, `BertModel` inside `BertForSequenceClassification`), so one adapter serves every head class.

    layers: dotted path of the `nn.ModuleList` of layers.
    index_attrs: dotted paths, inside one layer, of attributes holding the layer's index (renumbered by plans so that
        KV caches keep one slot per position).
    depth_fields: config fields describing the depth of this stack (set to the new depth) and per-layer config lists.
    final_norm: dotted path of the norm applied after the stack, if any.
    output_proj: dotted path, inside one layer, of the projection whose output is added straight to the residual stream
        (the MLP's down projection), where a linear map can be folded exactly (healing by `fold`); None where the
        family has none or normalizes that output before the residual add (Gemma's post-feedforward norm).
    final_proj: dotted path of a projection applied after the final norm and before the head, when the model has one
        (OPT's `decoder.project_out` where `word_embed_proj_dim` differs from the hidden size; None at run time when
        the model has none).
    module_depth_attrs: dotted paths of plain int attributes on modules holding the depth (e.g. DistilBERT's n_layers).
    kv_layout: how a layer's keys/values can be computed without the rest of the layer (`depthprune.kv.KV_LAYOUTS`:
        "rotary" for layers with input_layernorm + self_attn.k_proj / v_proj (+ k_norm) + rotary position embeddings,
        as Llama and Gemma 3 build them), so a skipped token's cache entry costs no query projection; None: the
        layer's own forward runs up to its cache write.
    sublayers: how a layer splits into attention and MLP sub-layers (`depthprune.sublayers.SUBLAYER_LAYOUTS`:
        "pre_norm" for Llama's, "sandwich" for Gemma 3's), for routers that skip either alone; None: whole layers only.
    """

    name: str
    layers: str
    index_attrs: tuple[str, ...] = ()
    depth_fields: tuple[ConfigField, ...] = ()
    final_norm: str | None = None
    final_proj: str | None = None
    output_proj: str | None = None
    module_depth_attrs: tuple[str, ...] = ()
    kv_layout: str | None = None
    sublayers: str | None = None


@dataclasses.dataclass(frozen=True)
class ClassificationHead:
    """A sequence classifier's own head, for early exit: `modules` maps a name to the dotted path (from the top
    *ForSequenceClassification model) of each head module; `forward(modules, hidden [batch, seq, hidden])` glues
    them into logits [batch, labels] exactly as the model's own forward does. Exit heads are copies of these modules
    run by the same `forward`."""

    modules: dict[str, str]
    forward: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ImageHead:
    """A diffusion transformer's own final step, shared by every exit as an LM head is: `conditioning(model,
    timestep [b], class_labels [b])` -> the per-sample modulation input [b, d] (computed once per denoising step),
    `forward(model, hidden [b, tokens, d], conditioning)` -> the model output [b, c, h, w] (output norm + modulation,
    projection, unpatchify), glued from the model's own modules exactly as its forward does."""

    conditioning: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How depthprune finds its way around one architecture family.

    model_types: the `config.model_type` values this adapter serves.
    stacks: the layer stacks, in execution order (encoder before decoder).
    heads: candidate dotted paths, from the top model, of the output head (the first one present is used),
        e.g. ("lm_head", "classifier").
    stack_sizes: optional function giving each stack's number of *source layers* when that differs from the length of
        its module list (ALBERT runs one shared group many times).
    apply_stack: optional function that rebuilds a stack for a plan instead of the generic list rearrangement
        (ALBERT's shared groups). Signature: (model, stack, source_indices) -> None, acting on the (already copied)
        model.
    post_apply: optional fix-up after a stack is rearranged (T5 moves its relative position bias to the new first
        block). Signature: (model, stack, source_layers, source_indices) -> None, where source_layers are the stack's
        modules before the plan.
    classification_head: optional ClassificationHead of the family's sequence classifier (encoders; early exit).
    layer_sequence: optional function giving the modules a stack runs, in order, when that is not simply its module
        list (ALBERT runs its shared groups several times). Used when depthprune runs layers one at a time.
    logit_softcap: the config field of the soft-capping the model applies to its head's logits
        (tanh(logits / cap) * cap, Gemma's `final_logit_softcapping`); read from the text config when set there.
    model_classes: class names this adapter serves, for models whose config has no `model_type` (diffusers models:
        `DiTTransformer2DModel`); matched along the model's class hierarchy.
    row_kwargs: layer keyword arguments that hold one entry per batch row even when 1-D (a DiT's `timestep` and
        `class_labels`), so that running a subset of rows slices them (other 1-D tensors, e.g. cache positions, are
        shared by every row).
    image_head: the final step of a diffusion transformer (ImageHead), where the model has no LM/classifier head.
    """

    family: str
    model_types: tuple[str, ...]
    stacks: tuple[StackSpec, ...]
    heads: tuple[str, ...] = ()
    stack_sizes: Callable[[nn.Module], dict[str, int]] | None = None
    apply_stack: Callable[[nn.Module, StackSpec, list[int]], None] | None = None
    post_apply: Callable[[nn.Module, StackSpec, list[nn.Module], list[int]], None] | None = None
    layer_sequence: Callable[[nn.Module, StackSpec], list[nn.Module]] | None = None
    logit_softcap: str | None = "final_logit_softcapping"
    classification_head: ClassificationHead | None = None
    model_classes: tuple[str, ...] = ()
    row_kwargs: tuple[str, ...] = ()
    image_head: ImageHead | None = None

    def __post_init__(self) -> None:
        if not self.model_types and not self.model_classes:
            raise ValueError(f"adapter {self.family!r} names no model_type and no model class")
        if not self.stacks:
            raise ValueError(f"adapter {self.family!r} names no layer stack")
        names = [s.name for s in self.stacks]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter {self.family!r} has duplicate stack names {names}")

    def stack(self, name: str) -> StackSpec:
        for s in self.stacks:
            if s.name == name:
                return s
        raise KeyError(f"{self.family} has no stack {name!r}; its stacks are {[s.name for s in self.stacks]}")

    def layers(self, model: nn.Module, stack: str | StackSpec) -> nn.ModuleList:
        spec = self.stack(stack) if isinstance(stack, str) else stack
        return get_path(backbone(model), spec.layers)

    def run_sequence(self, model: nn.Module, stack: str | StackSpec) -> list[nn.Module]:
        """The layer modules a stack runs, in execution order (a module may appear more than once)."""
        spec = self.stack(stack) if isinstance(stack, str) else stack
        if self.layer_sequence is not None:
            return self.layer_sequence(model, spec)
        return list(self.layers(model, spec))

    def present_stacks(self, model: nn.Module) -> tuple[StackSpec, ...]:
        """The stacks this model has (an encoder-only T5 has no decoder stack)."""
        root = backbone(model)
        found = tuple(s for s in self.stacks if has_path(root, s.layers))
        if not found:
            raise AttributeError(
                f"{type(model).__name__} has none of the layer stacks the {self.family} adapter names "
                f"({[s.layers for s in self.stacks]}); is the adapter registered for the right model_type?"
            )
        return found

    def find_stack(self, model: nn.Module, stack: str | None, who: str) -> StackSpec:
        """The stack named `stack` (default: the model's last one, the decoder of an encoder-decoder); a clear error
        naming `who` (the calling method) and the model's stacks when it has no such stack."""
        present = self.present_stacks(model)
        names = [s.name for s in present]
        if stack is None:
            return present[-1]
        if stack not in names:
            raise ValueError(f"{who}: the model has no stack {stack!r}; its stacks are {names}")
        return present[names.index(stack)]

    def num_layers(self, model: nn.Module) -> dict[str, int]:
        """Number of source layers of every present stack (what plan indices refer to)."""
        if self.stack_sizes is not None:
            return self.stack_sizes(model)
        root = backbone(model)
        return {s.name: len(get_path(root, s.layers)) for s in self.present_stacks(model)}

    def final_norm(self, model: nn.Module, stack: str | None = None) -> nn.Module | None:
        spec = self.stacks[-1] if stack is None else self.stack(stack)
        return get_path(backbone(model), spec.final_norm) if spec.final_norm else None

    def head(self, model: nn.Module) -> nn.Module | None:
        for path in self.heads:
            found = get_path(model, path, default=None)
            if found is not None:
                return found
        return None

    def layer_types(self, model: nn.Module, stack: str | StackSpec) -> list[str] | None:
        """The stack's per-layer attention types (the `layer_types` config field it names), or None."""
        spec = self.stack(stack) if isinstance(stack, str) else stack
        for field in spec.depth_fields:
            if field.name == "layer_types" and field.per_layer:
                owner = get_path(backbone(model), field.owner, default=None)
                types = getattr(getattr(owner, "config", None), "layer_types", None)
                return list(types) if types is not None else None
        return None

    def softcap(self, model: nn.Module) -> float | None:
        """The model's final logit soft-cap, or None when it has none."""
        if self.logit_softcap is None:
            return None
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(config, self.logit_softcap, None)
        return float(cap) if cap else None

    def final_projection(self, model: nn.Module) -> nn.Module | None:
        """The projection between the last stack's final norm and the head, when the model has one (else None)."""
        spec = self.stacks[-1]
        return get_path(backbone(model), spec.final_proj, default=None) if spec.final_proj else None

    def head_logits(self, model: nn.Module, state: torch.Tensor) -> torch.Tensor:
        """The model's own head on a final-normed state [b, s, hidden] -> [b, s, vocab]: its projection to the head's
        width where it has one (OPT's project_out), the head, and the logit soft-capping, as the model does."""
        proj = self.final_projection(model)
        logits = self.head(model)(proj(state) if proj is not None else state)
        cap = self.softcap(model)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def final_logits(self, model: nn.Module, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """The model's final step on the states leaving the last layer of `stack` (default: the last stack): its
        final norm, its head and its logit soft-capping. [b, s, hidden] -> [b, s, vocab]."""
        norm = self.final_norm(model, stack)
        return self.head_logits(model, norm(hidden) if norm is not None else hidden)


_MISSING = object()


def set_config_value(owner: Any, name: str, value: Any) -> None:
    """Set config field `name` of `owner` (a module with a `.config`): diffusers models keep a frozen config that only
    `register_to_config` changes (and saves); transformers configs take a plain attribute."""
    if hasattr(owner, "register_to_config") and isinstance(getattr(owner, "config", None), dict):
        owner.register_to_config(**{name: value})
    else:
        setattr(owner.config, name, value)


def backbone(model: nn.Module) -> nn.Module:
    """The module adapter paths start from: HF's `base_model` (the model itself for bare backbones)."""
    return getattr(model, "base_model", model)


def get_path(obj: Any, path: str, default: Any = _MISSING) -> Any:
    """Follow a dotted attribute path ("model.layers"); list items by integer ("block.0")."""
    if not path:
        return obj
    cur = obj
    for part in path.split("."):
        try:
            cur = cur[int(part)] if part.isdigit() else getattr(cur, part)
        except (AttributeError, IndexError, KeyError):
            if default is not _MISSING:
                return default
            raise AttributeError(f"{type(obj).__name__} has no attribute path {path!r} (failed at {part!r})") from None
    return cur


def set_path(obj: Any, path: str, value: Any) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = get_path(obj, parent_path)
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def has_path(obj: Any, path: str) -> bool:
    sentinel = object()
    return get_path(obj, path, default=sentinel) is not sentinel
