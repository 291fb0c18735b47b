"""Every registry of methods by name, one class: scorers, exit criteria (classifier and token), training recipes, KV
strategies and decoder exit-head kinds.

Built-ins are recorded here as name -> (module path, one-line description) and imported on first use, so listing
them (`depthprune list`) imports no method and start-up stays fast. This module is core: it imports no method.
Third parties add their own with `register_scorer`, `register_criterion`, `register_recipe`; an unknown name gets
one error listing the available ones.

    >>> from depthprune.registry import SCORERS
    >>> "sleb" in SCORERS
    True
    >>> SCORERS.get("nope")
    Traceback (most recent call last):
    ...
    ValueError: unknown scorer 'nope'; available: block_influence, angular, sleb, lookahead_kl
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

CRITERION_KINDS = ("classifier", "token")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered name: a built-in (`module` to import, `attr` of it, or the module itself when attr is None),
    a third party's object (`obj`), or a plain name that code dispatches on (neither)."""

    name: str
    description: str = ""
    module: str | None = None
    obj: Any = None
    builtin: bool = True


class Registry:
    """Names of one kind of method -> the method, lazily imported.

    kind: what the entries are, for messages ("scorer"); attr: the attribute of a built-in's module that is the
    method (None: the module itself, or no module for plain names such as KV strategies)."""

    def __init__(self, kind: str, attr: str | None = None, *, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.attr = attr
        self._entries: dict[str, Entry] = {}

    def add_builtins(self, table: Mapping[str, tuple[str | None, str]]) -> Registry:
        """Record built-ins: name -> (module path or None, one-line description)."""
        for name, (module, description) in table.items():
            self._entries[name] = Entry(name, description, module)
        return self

    def register(self, name: str, obj: Any, *, description: str | None = None, replace: bool = False) -> Any:
        """Register `obj` under `name`; an existing name is refused unless `replace=True`. Returns `obj`."""
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':' or ',', got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"a {self.kind} named {name!r} already exists; pick another name or pass replace=True")
        if description is None:
            description = ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]
        self._entries[name] = Entry(name, description, obj=obj, builtin=False)
        return obj

    def unregister(self, name: str) -> None:
        """Remove a third party's entry (built-ins stay)."""
        entry = self._entries.get(name)
        if entry is None or entry.builtin:
            raise ValueError(f"{name!r} is not a registered third-party {self.kind}")
        del self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str) -> str:
        """`name` if registered, else a ValueError that lists the available names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self._entries)}")
        return name

    def get(self, name: str) -> Any:
        """The method registered as `name` (a built-in is imported now, on first use)."""
        entry = self._entries[self.check(name)]
        if not entry.builtin:
            return entry.obj
        if entry.module is None:
            return name
        path, _, attr = entry.module.partition(":")  # "package.module:Name" names one object of a shared module
        module = importlib.import_module(path)
        attr = attr or self.attr
        return module if attr is None else getattr(module, attr)

    def describe(self) -> list[dict[str, Any]]:
        """One row per entry (name, description, where it comes from), without importing anything."""
        return [
            {"name": e.name, "description": e.description, "source": e.module or ("" if e.builtin else "registered")}
            for e in self._entries.values()
        ]


SCORERS = Registry("scorer", "SCORER").add_builtins(
    {
        "block_influence": ("depthprune.static.scorers.block_influence", "ShortGPT: 1 - cos(layer input, output)"),
        "angular": ("depthprune.static.scorers.angular", "Gromov et al.: angular distance across n-layer blocks"),
        "sleb": ("depthprune.static.scorers.sleb", "SLEB: greedy removal by calibration perplexity"),
        "lookahead_kl": (
            "depthprune.static.scorers.lookahead_kl",
            "beam search over removal sets by KL of the final next-token distribution",
        ),
    }
)

_C = "depthprune.exits.criteria"
CRITERIA = Registry("exit criterion", "CRITERION", plural="exit criteria (classifiers)").add_builtins(
    {
        "max_prob": (f"{_C}.max_prob", "confidence: exit when the top class probability >= threshold"),
        "margin": (f"{_C}.margin", "confidence: top-1 minus top-2 probability >= threshold"),
        "entropy": (f"{_C}.entropy", "confidence (DeeBERT): normalized entropy <= threshold"),
        "patience": (f"{_C}.patience", "internal ensemble (PABEE): the prediction unchanged for N exits"),
        "voting": (f"{_C}.voting", "internal ensemble: the majority class of the exits so far has enough votes"),
        "learned": (f"{_C}.learned", "learning to exit: the agreement classifier's probability >= threshold"),
        "q_exit": (f"{_C}.q_exit", "learning to exit (PALBERT): cumulative halting probability >= threshold"),
        "gate": (f"{_C}.gate", "learning to exit (JEI-DNN): the learned gate's probability >= threshold"),
        "static": (f"{_C}.static", "always exit after N layers (baseline)"),
    }
)

_T = "depthprune.exits.token_criteria"
TOKEN_CRITERIA = Registry("token exit criterion", "CRITERION", plural="token exit criteria (generation)").add_builtins(
    {
        "max_prob": (f"{_T}.max_prob", "CALM confidence: the exit's top token probability >= threshold"),
        "margin": (f"{_T}.margin", "CALM confidence: top-1 minus top-2 token probability >= threshold"),
        "saturation": (f"{_T}.saturation", "CALM saturation: cosine of consecutive hidden states >= threshold"),
        "learned": (f"{_T}.learned", "CALM meta-classifier: the heads' confidence >= threshold"),
        "fixed": (f"{_T}.fixed", "always exit after layer N (baseline)"),
    }
)

_R = "depthprune.exits.train"
RECIPES = Registry("training recipe").add_builtins(
    {
        "two_stage": (f"{_R}.two_stage", "DeeBERT: fine-tune backbone + final head, then the exits on it frozen"),
        "joint": (f"{_R}.joint", "PABEE / shallow-deep: depth-weighted sum of every exit's cross-entropy"),
        "self_distill": (f"{_R}.self_distill", "exits learn the final layer's softened distribution"),
        "palbert": (f"{_R}.palbert", "PALBERT / PonderNet: expected loss under the halting distribution"),
        "jei_dnn": (f"{_R}.jei_dnn", "JEI-DNN: gates and heads jointly, with a cost of computation"),
        "agreement": (f"{_R}.agreement", "the learned exit classifier alone (backbone and heads frozen)"),
    }
)

BACKBONE_RECIPES = Registry("backbone recipe", plural="backbone recipes (decoders trained for exits)").add_builtins(
    {
        "layerskip": (
            "depthprune.exits.train.layerskip:train_layerskip",
            "LayerSkip: layer dropout rising with depth + early-exit loss on the shared head, curriculum, LoRA",
        ),
    }
)

KV_STRATEGIES = Registry("kv strategy", plural="kv strategies (skipped layers' cache)").add_builtins(
    {
        "propagate": (
            "depthprune.kv:Propagate",
            "CALM: the exited state goes through the skipped layers' key/value projections",
        ),
        "recompute": (
            "depthprune.kv:Recompute",
            "EE-LLM: skipped entries are filled by the row's next token that reaches the layer",
        ),
    }
)

HEAD_KINDS = Registry("exit head kind", plural="decoder exit-head kinds").add_builtins(
    {
        "logit_lens": (None, "the model's own final norm + LM head after any layer (nothing trained)"),
        "lens": (None, "tuned lens: a square translator per exit, then the final norm + LM head"),
        "mlp": (None, "EE-Tuning style: a small MLP per exit, then the final norm + LM head"),
        "truncated": (
            "depthprune.exits.vocab_heads:TruncatedVocabHeads",
            "any of the above projecting onto the K most frequent calibration tokens only (cheap drafts/decisions)",
        ),
    }
)

HEALERS = Registry("healing method", "HEALER", plural="healing methods (static pruning)").add_builtins(
    {
        "fold": (
            "depthprune.static.heal.fold",
            "ReplaceMe: a least-squares linear map per removed run, folded into the layer before it (no training)",
        ),
        "replace": (
            "depthprune.static.heal.replace",
            "LLM-Streamline: each removed run becomes one layer (from the run's first), trained on h_i -> h_j (MSE)",
        ),
        "distill": (
            "depthprune.static.heal.distill",
            "LoRA on the pruned model, trained to the untouched model's next-token distribution (KL + NLL), merged; "
            "encoder-decoders: the decoder trained on the frozen encoder's cached outputs and the full model's "
            "transcripts",
        ),
    }
)

ROUTER_KINDS = Registry("router kind", plural="router kinds (layer skipping)").add_builtins(
    {
        "token_linear": (
            "depthprune.skipping.routers.token_linear:TokenLinearRouters",
            "decoders: per token, one linear gate per layer on the normalized state entering it (run or skip)",
        ),
        "token_sublayer": (
            "depthprune.skipping.routers.token_sublayer:TokenSublayerRouters",
            "decoders: per token, one linear gate per sub-layer (attention, MLP) of each layer, on the normalized "
            "state entering it (Llama, Mistral, Qwen2, Gemma 3)",
        ),
        "sample_linear": (
            "depthprune.skipping.routers.sample_linear:SampleLinearRouters",
            "encoders: per sample, one linear gate per layer on the masked mean of the state entering it",
        ),
    }
)

REGISTRIES: dict[str, Registry] = {
    "scorers": SCORERS,
    "criteria": CRITERIA,
    "token_criteria": TOKEN_CRITERIA,
    "recipes": RECIPES,
    "backbone_recipes": BACKBONE_RECIPES,
    "kv_strategies": KV_STRATEGIES,
    "head_kinds": HEAD_KINDS,
    "healers": HEALERS,
    "router_kinds": ROUTER_KINDS,
}
"""Every registry by the key `depthprune list --json` prints it under."""


def criteria_registry(kind: str = "classifier") -> Registry:
    """The exit criteria for `kind`: 'classifier' (one decision per input) or 'token' (one per generated token)."""
    if kind not in CRITERION_KINDS:
        raise ValueError(f"criterion kind must be one of {CRITERION_KINDS}, got {kind!r}")
    return CRITERIA if kind == "classifier" else TOKEN_CRITERIA


def register_scorer(name: str, scorer: Callable[..., Any], *, description: str | None = None) -> Callable[..., Any]:
    """Register a layer importance scorer: a callable `(model, batches, n_remove=1, *, stack=None, progress=False)
    -> LayerScores`, like the built-ins (see depthprune.static.scorers).

        >>> from depthprune.static.scorers import LayerScores
        >>> def last_is_least(model, batches, n_remove=1, *, stack=None, progress=False):
        ...     "scores rise with depth"
        ...     n = model.config.num_hidden_layers
        ...     return LayerScores("last_is_least", stack or "decoder", tuple(range(n)), tuple(range(n_remove)))
        >>> _ = register_scorer("last_is_least", last_is_least)
        >>> SCORERS.get("last_is_least") is last_is_least
        True
        >>> SCORERS.unregister("last_is_least")
    """
    return SCORERS.register(name, scorer, description=description)


def register_criterion(name: str, cls: Any, *, kind: str = "classifier", description: str | None = None) -> Any:
    """Register an exit criterion class for `kind` 'classifier' or 'token': `cls(threshold)` has `name`,
    `threshold`, `needs`, `decide(state) -> BoolTensor[batch]` and a static `grid()`.

        >>> class AfterTwo:
        ...     "exit after the third layer"
        ...     name, needs = "after_two", ()
        ...     def __init__(self, threshold):
        ...         self.threshold = threshold
        ...     def decide(self, state):
        ...         import torch
        ...         return torch.full((state.logits.shape[0],), state.layer >= 2)
        ...     @staticmethod
        ...     def grid():
        ...         return [0.0]
        >>> _ = register_criterion("after_two", AfterTwo)
        >>> from depthprune.exits.criteria import parse_criterion
        >>> parse_criterion("after_two:0").threshold
        0.0
        >>> CRITERIA.unregister("after_two")
    """
    return criteria_registry(kind).register(name, cls, description=description)


def register_recipe(name: str, recipe: Any, *, description: str | None = None) -> Any:
    """Register a training recipe for exit heads: an object (often a module) with `STAGES` (a list of
    depthprune.exits.train.Stage) and optionally `NEEDS` (the exit-head extras it reads).

        >>> import types
        >>> from depthprune.exits.train import Stage, cross_entropies, recipe_stages
        >>> mean_ce = lambda outputs, labels: cross_entropies(outputs, labels).mean()
        >>> mine = types.SimpleNamespace(STAGES=[Stage("mean_ce", mean_ce, "all")])
        >>> _ = register_recipe("mean_ce", mine, description="plain mean cross-entropy")
        >>> [s.name for s in recipe_stages("mean_ce")]
        ['mean_ce']
        >>> RECIPES.unregister("mean_ce")
    """
    if not hasattr(recipe, "STAGES"):
        raise ValueError(f"recipe {name!r} has no STAGES: give a module or object with a list of Stage")
    return RECIPES.register(name, recipe, description=description)


def register_kv_strategy(name: str, cls: Any, *, description: str | None = None) -> Any:
    """Register a KV strategy for the layers a token skips: a class built as `cls(cache, batch_size, num_layers,
    length)` with the methods of `depthprune.kv.KVStrategy` (start_step, before_layer, pending, left, end_step);
    `early_exit_generate(..., kv=name)` then uses it.

        >>> from depthprune.kv import Propagate
        >>> class Logged(Propagate):
        ...     name = "logged"
        >>> _ = register_kv_strategy("logged", Logged, description="propagate, under another name")
        >>> KV_STRATEGIES.get("logged") is Logged
        True
        >>> KV_STRATEGIES.unregister("logged")
    """
    missing = [m for m in ("start_step", "before_layer", "pending", "left", "end_step") if not hasattr(cls, m)]
    if missing:
        raise ValueError(f"kv strategy {name!r} lacks {missing}: see depthprune.kv.KVStrategy")
    return KV_STRATEGIES.register(name, cls, description=description)


def register_healer(name: str, healer: Callable[..., Any], *, description: str | None = None) -> Callable[..., Any]:
    """Register a healing method: `healer(model, plan, batches, *, progress=False, **options)` returning a new, healed
    model that runs `plan` (see depthprune.static.heal); `depthprune.static.heal.heal(..., method=name)` then uses it.

        >>> from depthprune.static.apply import apply_plan
        >>> _ = register_healer("none", lambda model, plan, batches, **kw: apply_plan(model, plan))
        >>> "none" in HEALERS
        True
        >>> HEALERS.unregister("none")
    """
    if not callable(healer):
        raise ValueError(f"healer {name!r} must be callable as healer(model, plan, batches, **options)")
    return HEALERS.register(name, healer, description=description)


def parse_threshold(text: str, criterion_class: Callable[[str], Any]) -> Any:
    """'max_prob:0.9' -> criterion_class('max_prob')(0.9), with errors that show the expected form."""
    name, sep, value = text.partition(":")
    cls = criterion_class(name.strip())
    if not sep:
        grid = cls.grid()
        raise ValueError(f"give a threshold: '{name}:VALUE', e.g. '{name}:{grid[len(grid) // 2]}'")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"threshold {value!r} of criterion {name!r} is not a number") from None
    return cls(threshold)
