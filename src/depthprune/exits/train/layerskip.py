"""LayerSkip (Elhoushi et al. 2024): train a decoder's backbone so that its early layers are good exits.

Two parts, both on the model's own modules:
- **layer dropout rising with depth**: at step t, row b skips layer l with probability
  p_l(t) = dropout_max * D(l) * S(t), D one of `DEPTH_SCALES` (LayerSkip: exp, 0 at the first layer, 1 at the last),
  S one of `TIME_SCALES` (constant, or rising linearly over training). A skipped layer hands its input on unchanged
  (stochastic depth, torchtune's `ModuleLayerDropoutWrapper`), and only the rows that run a layer are computed: the
  layers run through `depthprune.runner` (`StackCall.run(..., rows=)`), each with the arguments the model's own
  forward gives it, never a forked forward.
- **an early-exit loss**: the shared final norm + LM head (the adapter's final step) on the hidden state after each
  exit layer; the loss is sum_l w_l * CE_l over the final layer and the exits the curriculum turns on at that step,
  with w_l = scale(l + 1) (`LOSS_SCALES`, torchtune's `early_exit_loss`), times exit_scale for the exits, normalized to
  sum 1. `CURRICULA`: "none" (every chosen exit at every step), "rotational" (every `rotation`-th chosen exit,
  shifted by one each step), "gradual" (exits switched on from the last layer downwards, all on by 1/gradual_speed of
  training).

- optionally (not in LayerSkip; `kl_weight` > 0) a KL term that holds the last layer to the untouched model:
  kl_weight * KL(untouched || adapted) of the next-token distributions after the last layer, the untouched model being
  the same LoRA model with its adapter disabled (peft's `disable_adapter`, no second copy in memory). Measured on
  SmolLM2 (benchmarks/RESULTS.md 13) the exit losses alone cost the last layer 10% of held-out perplexity.

At dropout_max = 0, exit_scale = 0 and kl_weight = 0 the loss is the plain next-token cross-entropy of the model.
Only LoRA weights train (peft, `depthprune.lora.lora_copy`), through the one loop (`depthprune.training.train`); the
input model is never modified. The output folder holds the peft adapter (`adapter_config.json` +
`adapter_model.safetensors`, the base model recorded in it: `depthprune.io.load_model(folder)` loads base + adapter
merged), layerskip.json (the recipe) and train_log.json; with `merge=True` the merged model's weights too (an ordinary
HF folder). From the command line: `depthprune train-layerskip --model smollm2 -o out/smollm2-layerskip`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.decoding import decoder_parts, mask_arg, positions_from_mask, prompt_mask
from depthprune.lora import kl_to_teacher, lora_copy, lora_settings, merged_copy, untouched_logits
from depthprune.runner import capture_stack
from depthprune.training import TrainRun, check_token_blocks, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from depthprune.training import RunKwargs

RECIPE_NAME = "layerskip.json"
LOG_NAME = "train_log.json"
CONFIG_KEY = "layerskip"


# ---- the schedules: pure functions, chosen by name ------------------------------------------------------------------
def _exp_depth(layer: torch.Tensor, num_layers: int) -> torch.Tensor:
    return torch.exp(layer * math.log(2) / max(num_layers - 1, 1)) - 1


DEPTH_SCALES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "exp": _exp_depth,  # LayerSkip: e^(l ln2 / (L-1)) - 1, 0 at layer 0, 1 at layer L-1
    "linear": lambda layer, n: layer / max(n - 1, 1),
    "uniform": lambda layer, n: torch.ones_like(layer),
}
"""D(l): the share of dropout_max that layer l (0-based, of n) gets."""

TIME_SCALES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "linear": lambda step, total: min(step / max(total, 1), 1.0),  # rising from 0 to 1 over training
}
"""S(t): the share of dropout_max at optimizer step `step` of `total`."""

LOSS_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "one": lambda n: torch.ones_like(n),
    "l": lambda n: n,
    "sum_l": lambda n: n * (n + 1) / 2,
    "sqrt_l": torch.sqrt,
    "inv_l": lambda n: 1 / n,
}
"""scale(n) of the loss after n layers (n = layer index + 1), as torchtune's early_exit_loss scale types."""

CURRICULA = ("none", "rotational", "gradual")


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    """The recipe for a stack of `num_layers` layers. exit_layers: the chosen exits (0-based, below the last layer;
    None: every layer below the last). See the module docstring for the other fields."""

    num_layers: int
    dropout_max: float = 0.1
    dropout_scale: str = "exp"
    dropout_ramp: str = "constant"
    exit_scale: float = 1.0
    loss_scale: str = "l"
    exit_layers: tuple[int, ...] | None = None
    curriculum: str = "rotational"
    rotation: int = 4
    gradual_speed: float = 2.0
    kl_weight: float = 0.0

    def __post_init__(self) -> None:
        def bad(option: str, value: Any, want: str) -> ValueError:
            return ValueError(f"LayerSkip {option} must be {want}, got {value!r}")

        if not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise bad("num_layers", self.num_layers, "an int >= 2 (a stack with an exit below its last layer)")
        if not 0 <= self.dropout_max < 1:
            raise bad("dropout_max", self.dropout_max, "in [0, 1) (a rate; 1 would skip the last layer always)")
        for option, table in (("dropout_scale", DEPTH_SCALES), ("dropout_ramp", TIME_SCALES)):
            if getattr(self, option) not in table:
                raise bad(option, getattr(self, option), f"one of {', '.join(table)}")
        if self.loss_scale not in LOSS_SCALES:
            raise bad("loss_scale", self.loss_scale, f"one of {', '.join(LOSS_SCALES)}")
        if not (self.exit_scale >= 0 and math.isfinite(self.exit_scale)):
            raise bad("exit_scale", self.exit_scale, "a finite number >= 0 (0: no early-exit loss)")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise bad("kl_weight", self.kl_weight, "a finite number >= 0 (0: no KL term to the untouched model)")
        if self.curriculum not in CURRICULA:
            raise bad("curriculum", self.curriculum, f"one of {', '.join(CURRICULA)}")
        if not isinstance(self.rotation, int) or self.rotation < 1:
            raise bad("rotation", self.rotation, "an int >= 1 (every rotation-th exit is on at a step)")
        if not self.gradual_speed > 0:
            raise bad("gradual_speed", self.gradual_speed, "> 0 (all exits on after 1/gradual_speed of training)")
        if self.exit_layers is not None:
            layers = tuple(int(e) for e in self.exit_layers)
            if not layers or any(not 0 <= e < self.num_layers - 1 for e in layers) or len(set(layers)) != len(layers):
                raise ValueError(
                    f"LayerSkip exit_layers must be distinct layers in 0..{self.num_layers - 2} (the last layer "
                    f"{self.num_layers - 1} is the model's own output and always in the loss), got {self.exit_layers}"
                )
            object.__setattr__(self, "exit_layers", tuple(sorted(layers)))

    @property
    def exits(self) -> tuple[int, ...]:
        """The chosen exit layers (sorted)."""
        return tuple(range(self.num_layers - 1)) if self.exit_layers is None else tuple(self.exit_layers)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exit_layers"] = None if self.exit_layers is None else list(self.exit_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSkipConfig:
        data = dict(data)
        if data.get("exit_layers") is not None:
            data["exit_layers"] = tuple(data["exit_layers"])
        return cls(**data)


def dropout_rates(config: LayerSkipConfig, step: int = 0, total_steps: int = 1) -> torch.Tensor:
    """p_l(t) [num_layers]: each layer's skip probability at optimizer step `step` of `total_steps`."""
    layer = torch.arange(config.num_layers, dtype=torch.float64)
    depth = DEPTH_SCALES[config.dropout_scale](layer, config.num_layers)
    return (config.dropout_max * TIME_SCALES[config.dropout_ramp](step, total_steps) * depth).float()


def sample_skip_mask(
    config: LayerSkipConfig, batch: int, step: int = 0, total_steps: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BoolTensor [batch, num_layers]: True where row b skips layer l (drawn with `dropout_rates`)."""
    rates = dropout_rates(config, step, total_steps)
    return torch.rand(batch, config.num_layers, generator=generator) < rates


def active_exits(config: LayerSkipConfig, step: int = 0, total_steps: int = 1) -> list[int]:
    """The exit layers (below the last) whose loss is on at optimizer step `step` of `total_steps`."""
    exits = config.exits
    if config.exit_scale == 0:
        return []
    if config.curriculum == "none":
        return list(exits)
    if config.curriculum == "rotational":
        return [e for i, e in enumerate(exits) if (i - step) % config.rotation == 0]
    done = config.gradual_speed * step / max(total_steps, 1)  # "gradual": from the last layer downwards
    n = config.num_layers
    return [e for e in exits if done >= (n - e) / n]


def exit_loss_weights(config: LayerSkipConfig, exits: Sequence[int]) -> torch.Tensor:
    """Weights [len(exits) + 1] of the losses after `exits` and after the last layer (last), summing to 1."""
    after = torch.tensor([*exits, config.num_layers - 1], dtype=torch.float64) + 1
    weights = LOSS_SCALES[config.loss_scale](after)
    weights[:-1] *= config.exit_scale
    return (weights / weights.sum()).float()


# ---- the forward with layer dropout and exits -----------------------------------------------------------------------
def layerskip_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    skip: torch.Tensor | None = None,
    exits: Sequence[int] = (),
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the decoder stack of `model` over input_ids [batch, seq] with row b skipping the layers where skip[b] is
    True ([batch, num_layers]; None: none skipped). Returns the last layer's output [batch, seq, hidden] (before the
    final norm) and the hidden state after each layer in `exits`. Only the rows that run a layer are computed; the
    others keep their state through it. Gradients flow."""
    _, layers, _ = decoder_parts(model, "LayerSkip training")
    n = len(layers)
    mask = prompt_mask(input_ids, attention_mask)
    if skip is not None and (skip.dtype != torch.bool or tuple(skip.shape) != (input_ids.shape[0], n)):
        raise ValueError(f"skip must be a bool tensor [batch, {n}], got {skip.dtype} {tuple(skip.shape)}")
    if any(not 0 <= e < n for e in exits):
        raise ValueError(f"exit layers must be in 0..{n - 1}, got {list(exits)}")
    inputs = {"input_ids": input_ids, "attention_mask": mask_arg(mask), "position_ids": positions_from_mask(mask)}
    hidden, stack = capture_stack(model, {**inputs, "use_cache": False})  # [batch, seq, hidden] embedded
    wanted = set(exits)
    states: dict[int, torch.Tensor] = {}
    for idx in range(n):
        keep = None if skip is None else (~skip[:, idx]).nonzero().flatten().to(hidden.device)
        if keep is None or keep.numel() == hidden.shape[0]:
            hidden = stack.run(hidden, idx, idx + 1)
        elif keep.numel() > 0:
            out = stack.run(hidden.index_select(0, keep), idx, idx + 1, rows=keep)  # [kept, seq, hidden]
            hidden = hidden.index_copy(0, keep, out)
        if idx in wanted:
            states[idx] = hidden
    return hidden, states


def layerskip_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: LayerSkipConfig,
    *,
    skip: torch.Tensor | None = None,
    exits: Sequence[int] = (),
    attention_mask: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss": sum_l w_l CE_l (+ kl_weight * KL), "final": the last layer's CE, "exits": each exit's CE
    [len(exits)], "kl": the KL term (0 without teacher_logits)}: next-token cross-entropy over input_ids [batch, seq]
    (padding, if a mask is given, not scored), w = exit_loss_weights. teacher_logits [batch, seq, vocab]: the untouched
    model's logits, needed when config.kl_weight > 0; KL(teacher || last layer) is averaged over scored positions."""
    if config.kl_weight > 0 and teacher_logits is None:
        raise ValueError("the recipe has kl_weight > 0: pass teacher_logits (the untouched model's logits)")
    _, _, final_logits = decoder_parts(model, "LayerSkip training")
    exits = [int(e) for e in exits]
    last, states = layerskip_hidden(model, input_ids, skip, exits, attention_mask)
    target = input_ids[:, 1:].flatten()
    if attention_mask is not None:
        target = target.masked_fill(attention_mask[:, 1:].flatten() == 0, -100)

    def ce(hidden: torch.Tensor) -> torch.Tensor:
        logits = final_logits(hidden[:, :-1])  # [batch, seq-1, vocab]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target)

    weights = exit_loss_weights(config, exits).to(last.device)
    final = ce(last)
    loss = final if float(weights[-1]) == 1.0 else weights[-1] * final
    per_exit = []
    for w, e in zip(weights[:-1], exits, strict=True):
        if float(w) == 0.0:
            per_exit.append(torch.zeros((), device=last.device))
            continue
        value = ce(states[e])
        per_exit.append(value.detach())
        loss = loss + w * value
    kl = torch.zeros((), device=last.device)
    if config.kl_weight > 0:
        kl = kl_to_teacher(final_logits(last[:, :-1]), teacher_logits[:, :-1], target != -100)
        loss = loss + config.kl_weight * kl
    return {
        "loss": loss,
        "final": final.detach(),
        "exits": torch.stack(per_exit) if per_exit else final.new_zeros(0),
        "kl": kl.detach(),
    }


class _LayerSkipLoss(nn.Module):
    """The LoRA model plus the recipe, as one module whose forward DDP can wrap. The loop tells it the optimizer step
    (`set_step`) before each batch; the skip mask comes from torch's global RNG, which the loop seeds per step."""

    def __init__(
        self,
        model: nn.Module,
        config: LayerSkipConfig,
        total_steps: int,
        teacher: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher  # ids -> the untouched model's logits (only called when the recipe has a KL term)
        self.config = config
        self.total_steps = total_steps
        self.step = 0

    def set_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        skip = sample_skip_mask(self.config, ids.shape[0], self.step, self.total_steps).to(ids.device)
        exits = active_exits(self.config, self.step, self.total_steps)
        teacher = self.teacher(ids) if self.config.kl_weight > 0 else None
        out = layerskip_loss(self.model, ids, self.config, skip=skip, exits=exits, teacher_logits=teacher)
        layers_run = (~skip).sum(-1).double().mean()
        report = {"loss": out["loss"], "final": out["final"], "layers_run": layers_run}
        if self.config.kl_weight > 0:
            report["kl"] = out["kl"]
        return report


# ---- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def exit_agreement_with(
    model: nn.Module, reference: nn.Module, token_blocks: torch.Tensor, batch_size: int = 4
) -> dict[str, Any]:
    """Teacher-forced on token_blocks [n, seq]: per layer l of `model`, the share of positions where the shared final
    norm + head on the state after l picks the `reference` model's top token ("agreement", a list over layers, the
    last entry being `model`'s own output), and the perplexity of `model`'s and the reference's final layer."""
    _, layers, final_logits = decoder_parts(model, "exit agreement")
    device = next(model.parameters()).device
    n = len(layers)
    hits = torch.zeros(n, dtype=torch.float64)
    nll = {"model": 0.0, "reference": 0.0}
    count = 0

    def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
        return float(
            nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        )

    for ids in token_blocks.split(batch_size):
        ids = ids.to(device)
        ref = reference(input_ids=ids, use_cache=False).logits  # [b, s, vocab]
        top = ref.argmax(-1)
        last, states = layerskip_hidden(model, ids, exits=range(n - 1))
        for layer in range(n):
            logits = final_logits(last if layer == n - 1 else states[layer])
            hits[layer] += float((logits.argmax(-1) == top).sum())
        nll["model"] += summed_nll(logits, ids)  # the last layer's
        nll["reference"] += summed_nll(ref, ids)
        count += ids[:, 1:].numel()
    return {
        "agreement": (hits / token_blocks.numel()).tolist(),
        "ppl": math.exp(nll["model"] / count),
        "ppl_reference": math.exp(nll["reference"] / count),
        "tokens": int(token_blocks.numel()),
    }


# ---- training ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerSkipTrainResult:
    """What a run did. epoch_losses: per epoch, the mean loss (and final-layer CE, layers run) over all processes;
    history: this process's loss per optimizer step. peft_model: the trained LoRA model; model: merged (a plain HF
    model, when asked for). Neither is in to_dict."""

    recipe: dict[str, Any]
    lora_rank: int
    lora_alpha: float
    targets: list[str] | None
    base_model: str | None
    epochs: int
    lr: float
    batch_size: int
    seq_len: int
    seed: int
    num_blocks: int
    tokens: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    train_seconds: float
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    peft_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        skip = {"model", "peft_model"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def train_layerskip(
    model: nn.Module,
    config: LayerSkipConfig,
    token_blocks: torch.Tensor,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    targets: tuple[str, ...] | list[str] | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    warmup: float = 0.05,
    weight_decay: float = 0.0,
    base_model: str | None = None,
    merge: bool = False,
    **run_kwargs: Unpack[RunKwargs],
) -> LayerSkipTrainResult:
    """Train LoRA adapters (rank `lora_rank`, on `targets` or every linear projection of the decoder layers) of a copy
    of `model` with the LayerSkip recipe `config` on token blocks [n_blocks, seq_len]. AdamW, linear warm-up then
    decay; eval mode (no dropout besides the recipe's). base_model: what the saved adapter records as its base (a
    folder, hub id or alias that `depthprune.io.load_model` reads; default: the folder `model` came from). merge: also
    return (and save) the merged plain model. `model` is not modified."""
    if not isinstance(config, LayerSkipConfig):
        raise TypeError(f"config must be a LayerSkipConfig, got {type(config).__name__}")
    check_token_blocks(token_blocks, epochs, batch_size, lr, min_len=2)
    _, layers, _ = decoder_parts(model, "LayerSkip training")
    if config.num_layers != len(layers):
        raise ValueError(f"the recipe was built for {config.num_layers} layers, the model has {len(layers)}")
    base = base_model or (getattr(model.config, "_name_or_path", "") or None)
    peft_model = lora_copy(model, lora_rank, lora_alpha, targets)
    peft_model.peft_config["default"].base_model_name_or_path = base
    lora_model = peft_model.get_base_model()  # the HF class with LoRA inside: what the runner runs
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    total = max(1, epochs * math.ceil(len(token_blocks) / batch_size))
    loss = _LayerSkipLoss(lora_model, config, total_steps=total, teacher=untouched_logits(peft_model))

    def make_result(run: TrainRun, merged: nn.Module | None) -> LayerSkipTrainResult:
        return LayerSkipTrainResult(
            recipe=config.to_dict(),
            **lora_settings(lora_rank, lora_alpha, targets),
            base_model=base,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seq_len=int(token_blocks.shape[1]),
            seed=seed,
            num_blocks=len(token_blocks),
            tokens=int(token_blocks.numel()) * epochs,
            **run.record(),
            model=merged,
            peft_model=peft_model,
        )

    merged: nn.Module | None = None

    def merge_now() -> nn.Module:
        out = merged_copy(peft_model).eval()
        setattr(out.config, CONFIG_KEY, config.to_dict())
        return out

    def save(folder: Path, run: TrainRun) -> None:
        nonlocal merged
        peft_model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        if merge:
            merged = merge_now()
            merged.save_pretrained(folder)
        (folder / RECIPE_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        (folder / LOG_NAME).write_text(json.dumps(make_result(run, None).to_dict(), indent=1))

    run = train(
        loss,
        trainable,
        token_blocks.long(),
        epochs=epochs,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        train_mode=False,  # eval mode: no dropout but the recipe's
        batch_size=batch_size,
        seed=seed,
        save=save,
        on_step=loss.set_step,
        fingerprint={"recipe": config.to_dict(), "lora_rank": lora_rank, "targets": targets and list(targets)},
        desc="layerskip LoRA",
        **run_kwargs,
    )
    for p in trainable:
        p.requires_grad_(False)
    if merge and merged is None:
        merged = merge_now()
    return make_result(run, merged)


def load_recipe(folder: str | os.PathLike) -> LayerSkipConfig:
    """The recipe a saved LayerSkip folder was trained with."""
    path = Path(folder) / RECIPE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train with train_layerskip(..., output_dir=...) first")
    return LayerSkipConfig.from_dict(json.loads(path.read_text()))


__all__ = [
    "CURRICULA",
    "DEPTH_SCALES",
    "LOSS_SCALES",
    "TIME_SCALES",
    "LayerSkipConfig",
    "LayerSkipTrainResult",
    "active_exits",
    "dropout_rates",
    "exit_agreement_with",
    "exit_loss_weights",
    "layerskip_hidden",
    "layerskip_loss",
    "load_recipe",
    "sample_skip_mask",
    "train_layerskip",
]
