"""Training recipes for exit heads, one file each; a recipe is a loss.

Each recipe module has a pure `loss(outputs: AllExits, labels, **hyper) -> Tensor` and `STAGES`: the stages the
trainer runs in order, each a loss plus which parameters it trains (data, not code: DeeBERT's two stages are two
entries). `NEEDS` names the exit-head extras a recipe reads ('halting', 'gate', 'agreement').

- two_stage (DeeBERT): fine-tune backbone + final head, then train the exit heads on the frozen backbone;
- joint (PABEE, shallow-deep): depth-weighted sum of every exit's cross-entropy and the final layer's;
- self_distill: exits learn the final layer's softened distribution;
- palbert (PALBERT / PonderNet): expected cross-entropy under the halting distribution + KL to a geometric prior;
- jei_dnn (JEI-DNN): gates learned jointly with the heads through an expected loss with a cost of computation;
- agreement: the learned exit classifier alone (backbone and heads frozen), also appended by `fit_agreement=True`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from depthprune.exits.inference import AllExits
from depthprune.registry import RECIPES

TRAINABLE = ("model", "heads", "all", "agreement")
"""What a stage trains: 'model' (backbone + final head), 'heads' (every exit head with its extras), 'all' (both),
'agreement' (only the agreement extra)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: minimize `loss` over the parameters named by `trainable` (one of TRAINABLE)."""

    name: str
    loss: Callable[..., torch.Tensor]
    trainable: str

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"stage {self.name!r}: trainable must be one of {TRAINABLE}, got {self.trainable!r}")


def list_recipes() -> list[str]:
    return RECIPES.names()


def recipe_module(name: str) -> ModuleType:
    """The recipe registered as `name` (a module, or a third party's object with STAGES; see
    depthprune.registry.register_recipe)."""
    return RECIPES.get(name)


def recipe_stages(name: str) -> list[Stage]:
    return list(recipe_module(name).STAGES)


def trainable_parameters(which: str, model: nn.Module, heads: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters a stage trains (see TRAINABLE)."""
    if which == "model":
        yield from model.parameters()
    elif which == "heads":
        yield from heads.parameters()
    elif which == "all":
        yield from model.parameters()
        yield from heads.parameters()
    elif which == "agreement":
        if not hasattr(heads, "agreement"):
            raise ValueError("these exit heads have no 'agreement' extra; make them with extras=('agreement',)")
        yield from heads.agreement.parameters()
    else:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")


# ---- helpers shared by the recipes -----------------------------------------------------------------------------------
def depths(outputs: AllExits) -> list[int]:
    """Number of layers run before each exit and before the final head (1-based depths; the last is the stack depth)."""
    n_exits = len(outputs.exits)
    layers = outputs.layers if outputs.layers is not None else tuple(range(n_exits))
    num_layers = outputs.num_layers if outputs.num_layers is not None else n_exits + 1
    if len(layers) != n_exits:
        raise ValueError(f"AllExits has {n_exits} exits but {len(layers)} exit layers")
    return [i + 1 for i in layers] + [num_layers]


def all_logits(outputs: AllExits) -> list[torch.Tensor]:
    """Logits [batch, labels] of every exit, then the final layer's."""
    return [e.logits for e in outputs.exits] + [outputs.final]


def cross_entropies(outputs: AllExits, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of every exit and the final layer: [exits + 1, batch]."""
    return torch.stack([F.cross_entropy(z.float(), labels, reduction="none") for z in all_logits(outputs)])


def extra_logits(outputs: AllExits, extra: str) -> torch.Tensor:
    """[exits, batch]: the named extra's logits of every exit; a clear error when the heads lack it."""
    values = [getattr(e, extra) for e in outputs.exits]
    if not values or any(v is None for v in values):
        raise ValueError(
            f"this recipe needs exit heads with the {extra!r} extra (ExitHeads.for_model(..., extras=...))"
        )
    return torch.stack([v.float() for v in values])


def exit_distribution(stop_logits: torch.Tensor) -> torch.Tensor:
    """PonderNet's distribution over where to stop, from per-exit stopping logits [exits, batch]:
    p_i = lambda_i * prod_{j<i} (1 - lambda_j), and the final layer takes the remainder prod_j (1 - lambda_j).
    Returns log-probabilities [exits + 1, batch] (computed in log space, so they sum to 1 exactly up to rounding)."""
    log_stop = F.logsigmoid(stop_logits)  # log lambda_i
    log_go = F.logsigmoid(-stop_logits)  # log (1 - lambda_i)
    zero = torch.zeros_like(log_go[:1])
    reach = torch.cat([zero, log_go.cumsum(0)])  # log prod_{j<i} (1 - lambda_j), [exits + 1, batch]
    return reach + torch.cat([log_stop, zero])


def agreement_loss(outputs: AllExits, labels: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of each exit's agreement logit against 'this exit's argmax equals the final layer's' (a detached target):
    the learned exit classifier's training signal. Labels are not used (agreement needs none)."""
    logits = extra_logits(outputs, "agreement")  # [exits, batch]
    final = outputs.final.detach().argmax(-1)
    target = torch.stack([(e.logits.detach().argmax(-1) == final).float() for e in outputs.exits])
    return F.binary_cross_entropy_with_logits(logits, target)


def with_agreement(loss: Callable[..., torch.Tensor], weight: float = 1.0) -> Callable[..., torch.Tensor]:
    """`loss` plus `weight` * agreement_loss: trains the learned exit classifier alongside any recipe."""

    def combined(outputs: AllExits, labels: torch.Tensor, **hyper) -> torch.Tensor:
        return loss(outputs, labels, **hyper) + weight * agreement_loss(outputs, labels)

    combined.__name__ = f"{getattr(loss, '__name__', 'loss')}+agreement"
    combined.__wrapped__ = loss  # inspect.signature shows the recipe's own hyperparameters
    return combined
