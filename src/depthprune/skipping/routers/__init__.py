"""What every router kind shares: the config (which model, which layers are routed), the facts of the model they
belong to (and the check that refuses another model), the gate math, and `build_routers`.

A router kind is an nn.Module class registered in `depthprune.registry.ROUTER_KINDS`, built as `cls(config)`, with
`granularity` ("token": one decision per position, decoders; "sample": one per input, encoders) and
`logits(layer, hidden, mask) -> [batch, seq]` (token) or `[batch]` (sample): the logit of P(layer runs) from the hidden
state entering `layer` ([batch, seq, hidden]; mask [batch, seq] or None). A layer runs when that probability is >=
the threshold: threshold 0 runs every layer (the untouched model), 1 skips about every routed one. A kind with
`parts` ("attention", "mlp") decides per sub-layer instead (`logits(layer, hidden, mask, part=...)`, each part reading
the state entering it; depthprune.sublayers), and depth is counted in layers, each part by its share of the layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from depthprune.adapters.registry import get_adapter
from depthprune.errors import RouterError
from depthprune.registry import ROUTER_KINDS

GRANULARITY = {"token_linear": "token", "token_sublayer": "token", "sample_linear": "sample"}
INITS = ("uniform", "static", "static_parts")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Routers of one model: kind, the model's description (checked on load: model_type, depth, hidden size and a
    fingerprint of its input embeddings, so routers trained on another checkpoint of the same shape are refused) and
    the 0-based layers that have a router (the others always run). target_layers: the mean depth trained for."""

    kind: str
    model_type: str
    num_layers: int
    hidden_size: int
    layers: tuple[int, ...]
    fingerprint: tuple[float, float] = (0.0, 0.0)
    target_layers: float | None = None
    init_bias: float | None = None  # None: logit(share of routed layers a target keeps), else 3 (all run)
    init: str = "uniform"  # "uniform": every gate starts at init_bias; "static": per-layer init_biases
    init_biases: tuple[float, ...] | None = None  # one per routed layer (init "static": depthprune.skipping.init)
    init_scorer: str | None = None  # the importance scorer behind init_biases
    init_removed: tuple[int, ...] = ()  # the static plan init_biases reproduce: the layers it removes
    init_removed_parts: tuple[str, ...] = ()  # sub-layer routers: the sub-layers it removes ("5_attention")
    sink_tokens: int = 0  # token routers: the first real positions of each sequence always run every layer

    def __post_init__(self) -> None:
        ROUTER_KINDS.check(self.kind)
        if int(self.sink_tokens) != self.sink_tokens or self.sink_tokens < 0:
            raise RouterError(f"sink_tokens must be a whole number >= 0, got {self.sink_tokens!r}")
        object.__setattr__(self, "sink_tokens", int(self.sink_tokens))
        layers = tuple(sorted({int(i) for i in self.layers}))
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if not layers or bad:
            raise RouterError(
                f"router layers {list(self.layers)} out of range: give 0-based layers of this {self.num_layers}-layer "
                f"stack (0..{self.num_layers - 1}), at least one"
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "fingerprint", tuple(float(v) for v in self.fingerprint))
        if self.init not in INITS:
            raise RouterError(f"unknown router init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.init_biases is not None:
            biases = tuple(float(b) for b in self.init_biases)
            parts = len(getattr(ROUTER_KINDS.get(self.kind), "parts", ())) or 1
            if len(biases) not in (len(layers), len(layers) * parts):
                raise RouterError(
                    f"init_biases has {len(biases)} values for {len(layers)} routed layers: one each (or one per "
                    "sub-layer of each)"
                )
            object.__setattr__(self, "init_biases", biases)
        elif self.init != "uniform":
            raise RouterError(
                f"init {self.init!r} needs init_biases (build them with depthprune.skipping.init.static_init)"
            )
        object.__setattr__(self, "init_removed", tuple(int(i) for i in self.init_removed))
        object.__setattr__(self, "init_removed_parts", tuple(str(k) for k in self.init_removed_parts))
        if self.target_layers is not None:
            check_target(self.target_layers, self.num_layers, len(layers))
        if self.init_bias is None:
            bias = 3.0
            if self.target_layers is not None:  # P(run) = the share the target keeps (the compute term starts at 0)
                keep = (self.target_layers - (self.num_layers - len(layers))) / len(layers)
                keep = min(max(keep, 0.02), 0.98)
                bias = math.log(keep / (1 - keep))
            object.__setattr__(self, "init_bias", bias)

    @property
    def granularity(self) -> str:
        return GRANULARITY.get(self.kind, "token")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        biases = data.get("init_biases")
        return cls(
            **{
                **data,
                "layers": tuple(data["layers"]),
                "fingerprint": tuple(data.get("fingerprint", (0, 0))),
                "init_biases": None if biases is None else tuple(biases),
                "init_removed": tuple(data.get("init_removed", ())),
                "init_removed_parts": tuple(data.get("init_removed_parts", ())),
            }
        )


def check_target(target: float, num_layers: int, routed: int) -> float:
    """`target` mean executed layers, or a RouterError unless it lies in [always-run layers, num_layers]."""
    low = num_layers - routed
    if not low <= float(target) <= num_layers:
        raise RouterError(
            f"target depth {target} out of range: with {routed} routed layers of {num_layers}, the mean number of "
            f"executed layers can lie in {low}..{num_layers}; pick a target there (or route more layers)"
        )
    return float(target)


def check_threshold(threshold: float) -> float:
    """`threshold` as a float, or a RouterError unless it lies in [0, 1] (a probability)."""
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise RouterError(
            f"router threshold {threshold!r} outside [0, 1]: a layer runs when its router's probability is >= the "
            "threshold (0: every layer runs; 0.5: the trained decision); calibrate one with `depthprune calibrate`"
        )
    return float(threshold)


def model_facts(model: nn.Module) -> dict[str, Any]:
    """(model_type, depth of the routed stack, hidden size, granularity, fingerprint) of `model`: decoder-only LMs
    route tokens, encoders (sequence classifiers) route samples; encoder-decoders are refused."""
    adapter = get_adapter(model)
    stacks = adapter.present_stacks(model)
    if len(stacks) != 1 or getattr(model.config, "is_encoder_decoder", False):
        raise RouterError(
            f"routers support decoder-only LMs and encoder classifiers; {type(model).__name__} has the stacks "
            f"{[s.name for s in stacks]}"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    depth = len(adapter.run_sequence(model, stacks[0]))
    emb = model.get_input_embeddings().weight
    sample = emb[: min(64, emb.shape[0])].detach().float()
    return {
        "model_type": model.config.model_type,
        "num_layers": depth,
        "hidden_size": int(config.hidden_size),
        "granularity": "token" if stacks[0].name == "decoder" else "sample",
        "sublayers": stacks[0].sublayers,
        "fingerprint": (float(sample.mean()), float(sample.abs().mean())),
    }


def check_model(config: RouterConfig, model: nn.Module) -> None:
    """A RouterError unless `model` is the model the routers were built for."""
    facts = model_facts(model)
    mine = (facts["model_type"], facts["num_layers"], facts["hidden_size"])
    theirs = (config.model_type, config.num_layers, config.hidden_size)
    if mine != theirs:
        raise RouterError(
            "these routers were built for a {} with {} layers and hidden size {}, not this {} with {} layers and "
            "hidden size {}; use them with the model they were trained on, or train new ones (depthprune "
            "train-router)".format(*theirs, *mine)
        )
    a, b = facts["fingerprint"], config.fingerprint
    if any(abs(x - y) > 1e-2 * max(abs(y), 1e-4) for x, y in zip(a, b, strict=True)):
        raise RouterError(
            f"these routers were trained on another {config.model_type} checkpoint (input-embedding fingerprint "
            f"{tuple(round(v, 6) for v in b)}, this model's {tuple(round(v, 6) for v in a)}); use them with the "
            "model they were trained on, or train new ones (depthprune train-router)"
        )
    parts = getattr(ROUTER_KINDS.get(config.kind), "parts", ())
    if parts and facts["sublayers"] is None:
        raise RouterError(
            f"{config.kind} routers skip attention and MLP sub-layers apart, but this {config.model_type}'s layers "
            "do not split (supported: Llama, Mistral, Qwen2, Gemma 3 decoders); use router kind token_linear"
        )
    if facts["granularity"] != config.granularity:
        raise RouterError(
            f"{config.kind} routers decide per {config.granularity}, but this model needs per-"
            f"{facts['granularity']} decisions; pick a {facts['granularity']} router kind"
        )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The layers routed by default: all but the first and the last (the embedding's first transform and the layer
    the head reads are the ones static pruning also finds indispensable)."""
    return tuple(range(1, num_layers - 1)) if num_layers > 2 else tuple(range(num_layers))


def build_routers(
    model: nn.Module, kind: str | None = None, layers: tuple[int, ...] | list[int] | None = None, **options: Any
) -> nn.Module:
    """New routers for `model` (kind: default token_linear for decoders, sample_linear for encoders; layers: default
    `default_layers`), on the model's device, float32, never skipping at threshold 0.5 before training."""
    facts = model_facts(model)
    kind = kind or ("token_linear" if facts["granularity"] == "token" else "sample_linear")
    config = RouterConfig(
        kind=kind,
        model_type=facts["model_type"],
        num_layers=facts["num_layers"],
        hidden_size=facts["hidden_size"],
        layers=default_layers(facts["num_layers"]) if layers is None else tuple(layers),
        fingerprint=facts["fingerprint"],
        **options,
    )
    check_model(config, model)  # granularity
    routers = ROUTER_KINDS.get(kind)(config)
    return routers.to(next(model.parameters()).device)


def sink_positions(routers: nn.Module, shape: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool [batch, seq], True at each row's first `routers.config.sink_tokens` real positions (mask: 1 = a real
    token, left padding allowed; None: no padding), which always run every layer: the first position is the
    attention sink of these models (Xiao et al., 2023) and carries their massive activations (Sun et al., 2024), so
    one layer skipped there changes every later token (benchmarks/RESULTS.md section 29). None when sink_tokens is 0
    or the routers decide per sample."""
    n = getattr(getattr(routers, "config", None), "sink_tokens", 0)
    if not n or getattr(routers, "granularity", "token") != "token":
        return None
    batch, seq = shape
    if mask is None:
        return (torch.arange(seq) < n).expand(batch, seq)
    real = mask.bool()
    return real & (real.long().cumsum(-1) <= n)


def rms(hidden: torch.Tensor) -> torch.Tensor:
    """hidden / its root mean square over the last dimension (parameter-free: the residual stream's scale grows with
    depth, the gate should read its direction)."""
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class LinearGates(nn.Module):
    """One linear gate per routed layer (weight 0, bias `config.init_bias`: 3, every layer runs, or where a target is
    given P(run) = the share of routed layers it keeps, so training starts at the target depth; with init "static"
    the per-layer `config.init_biases`, so the untrained routers run the static plan). The base of the built-in
    kinds, which differ only in what they read (a token's state, a sample's mean state)."""

    granularity = "token"
    parts: tuple[str, ...] = ()  # (): one gate per layer; ("attention", "mlp"): one per sub-layer

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.layers = config.layers
        self.num_layers = config.num_layers
        units = self.parts or (None,)
        self.gates = nn.ModuleDict(
            {gate_key(i, part): nn.Linear(config.hidden_size, 1) for i in config.layers for part in units}
        )
        biases = config.init_biases or (config.init_bias,) * len(config.layers)
        if len(biases) == len(config.layers):  # one per layer: on each of its parts
            biases = [b for b in biases for _ in units]
        for gate, bias in zip(self.gates.values(), biases, strict=True):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, bias)

    def features(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def logits(
        self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None = None, part: str | None = None
    ) -> torch.Tensor:
        """Logit of P(layer (its sub-layer `part`) runs): [batch, seq] per token or [batch] per sample."""
        return self.gates[gate_key(layer, part)](self.features(hidden, mask)).squeeze(-1)

    def run_mask(
        self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None, threshold: float, part: str | None = None
    ) -> torch.Tensor | None:
        """Bool decisions (True: the layer, or its sub-layer `part`, runs) for the rows of `hidden`; None when it has
        no router."""
        key = gate_key(layer, part)
        if key not in self.gates:
            return None
        return torch.sigmoid(self.logits(layer, hidden, mask, part)) >= threshold


def gate_key(layer: int, part: str | None = None) -> str:
    """The gates' ModuleDict key of a layer ("5") or of one of its sub-layers ("5_attention")."""
    return str(layer) if part is None else f"{layer}_{part}"


__all__ = [
    "RouterConfig",
    "gate_key",
    "LinearGates",
    "build_routers",
    "check_model",
    "check_target",
    "check_threshold",
    "default_layers",
    "model_facts",
    "rms",
    "sink_positions",
]
