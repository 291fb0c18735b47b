"""Distillation healing of an encoder-decoder (Whisper, BART, T5) whose plan makes a stack shallower, with the encoder
frozen and its outputs computed once (distil-whisper's recipe; Kasai et al.'s deep encoder, shallow decoder).

The healer `distill` (static/heal/distill.py) hands encoder-decoder models here: same method (the untouched model is
the teacher, KL(teacher || student) at `temperature` * temperature**2 + `nll_weight` * NLL), different data and
different trained parameters, which is why it is a file of its own beside the decoder-only one rather than branches
inside it. The calibration batches are encoder inputs (dicts holding the model's main input, `input_features` for
Whisper, `input_ids` + `attention_mask` for a text encoder). `encode_cache` runs the untouched encoder on them once
and transcribes them with the untouched model's greedy `generate` (from the cached encoder outputs): those
transcripts, behind the decoder prompt, are the pseudo-labels the student is taught on, teacher-forced, position by
position, against the teacher's full next-token distributions. When the plan also prunes the encoder, the pruned
encoder's outputs are cached the same way (frozen too): the decoder learns to read them.

Trained: the kept decoder layers and the decoder's final norm, in full (distil-whisper trains the decoder, not
adapters); the encoder, the embeddings and the (tied) head stay as they are. Through `depthprune.training.train`;
the input model is never modified; the result is an ordinary model of the input's class.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthprune.adapters.base import backbone, get_path
from depthprune.adapters.registry import get_adapter
from depthprune.plan import LayerPlan
from depthprune.static.apply import apply_plan, layer_sizes
from depthprune.static.heal import check_options
from depthprune.training import RunKwargs, train

if TYPE_CHECKING:
    from typing_extensions import Unpack

RECORD_KEY = "depthprune_healing"


@dataclasses.dataclass
class EncoderCache:
    """The frozen teacher's work, done once: its encoder outputs, its transcripts and its next-token logits.

    hidden: the untouched encoder's outputs [n, frames, d]; labels: decoder prompt + the untouched model's greedy
    transcript + end of text, right-padded [n, t]; lengths: the real tokens per row [n]; logits: the untouched
    model's next-token logits at every predicted position of every row, rows after each other [sum(lengths - 1),
    vocab] (float16 by default: 1.7 MB per 16-token utterance of Whisper's 51,864 tokens, against 2.3 MB of encoder
    output; with them cached a training step runs the student alone); encoder_mask: the encoder's attention mask
    [n, frames] (text encoders) or None (Whisper attends to every frame)."""

    hidden: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor
    encoder_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.hidden.shape[0]
        if self.hidden.dim() != 3 or self.labels.dim() != 2 or self.labels.shape[0] != n or len(self.lengths) != n:
            raise ValueError(
                f"an EncoderCache needs hidden [n, frames, d], labels [n, t] and lengths [n] of one n; got "
                f"{tuple(self.hidden.shape)}, {tuple(self.labels.shape)}, {tuple(self.lengths.shape)}"
            )
        if int(self.lengths.min()) < 2:
            raise ValueError("every pseudo-label needs at least 2 tokens (the prompt and one prediction)")
        if self.logits.dim() != 2 or self.logits.shape[0] != int((self.lengths - 1).sum()):
            raise ValueError(
                f"EncoderCache.logits must be [sum(lengths - 1) = {int((self.lengths - 1).sum())}, vocab], got "
                f"{tuple(self.logits.shape)}"
            )
        self._starts = torch.cat([torch.zeros(1, dtype=torch.long), (self.lengths - 1).cumsum(0)])

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def tokens(self) -> int:
        """Predicted target tokens (every position but the first of each row)."""
        return int((self.lengths - 1).sum())

    def teacher_logits(self, index: torch.Tensor) -> torch.Tensor:
        """The cached teacher logits of rows `index`, right-padded with zeros to the longest: [b, t-1, vocab]."""
        t = int(self.lengths[index].max())
        out = torch.zeros(len(index), t - 1, self.logits.shape[1], dtype=torch.float32)
        for j, i in enumerate(index.tolist()):
            a, b = int(self._starts[i]), int(self._starts[i + 1])
            out[j, : b - a] = self.logits[a:b].float()
        return out

    def rows(self, index: torch.Tensor, hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A training batch of rows `index`, trimmed to its longest label, with the teacher's logits
        (`hidden`: the student's own encoder outputs, when its encoder differs)."""
        t = int(self.lengths[index].max())
        out = {
            "labels": self.labels[index, :t],
            "lengths": self.lengths[index],
            "teacher_logits": self.teacher_logits(index),
            "student_hidden": (self.hidden if hidden is None else hidden)[index],
        }
        if self.encoder_mask is not None:
            out["encoder_mask"] = self.encoder_mask[index]
        return out


def require_encoder_decoder(model: nn.Module, who: str) -> None:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        raise ValueError(
            f"{who} needs an encoder-decoder model (Whisper, BART, T5), got {type(model).__name__}; decoder-only "
            "models are healed on token blocks by depthprune.static.heal.distill"
        )


def check_batches(model: nn.Module, batches: Any) -> list[dict[str, torch.Tensor]]:
    """The calibration batches as dicts of encoder inputs: each a dict holding `model.main_input_name`
    (`input_features` [b, mels, frames] for Whisper, `input_ids` [b, s] for text) or that tensor alone."""
    key = getattr(model, "main_input_name", "input_ids")
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]
    batches = [{key: b} if isinstance(b, torch.Tensor) else b for b in list(batches)]
    hint = f"a list of dicts holding {key!r} (a tensor [batch, ...]), e.g. a feature extractor's output"
    if not batches:
        raise ValueError(f"healing an encoder-decoder needs calibration batches: {hint}")
    for i, b in enumerate(batches):
        if not isinstance(b, dict) or not isinstance(b.get(key), torch.Tensor) or b[key].numel() == 0:
            got = type(b).__name__ if not isinstance(b, dict) else f"a dict with keys {sorted(b)}"
            raise ValueError(f"calibration batch {i}: need {hint}; got {got}")
        if key == "input_features":
            mels = getattr(model.config, "num_mel_bins", None)
            frames = 2 * getattr(model.config, "max_source_positions", 0)
            shape = tuple(b[key].shape)
            if b[key].dim() != 3 or shape[1] != mels or shape[2] != frames or not b[key].is_floating_point():
                raise ValueError(
                    f"calibration batch {i}: input_features must be float log-mel features [batch, {mels}, {frames}] "
                    f"(the model's feature extractor, 16 kHz audio padded to 30 s), got {b[key].dtype} {shape}"
                )
        unknown = set(b) - {key, "attention_mask"}
        if unknown:
            raise ValueError(f"calibration batch {i}: unexpected keys {sorted(unknown)} (only {key!r}, attention_mask)")
    return batches


def decoder_prompt(model: nn.Module) -> list[int]:
    """The tokens every decoded sequence starts with: the decoder start token, and for an English-only Whisper
    <|notimestamps|> (what `generate` puts there without timestamps). Multilingual Whisper needs its language and task
    tokens too: refused here, with the reason."""
    gen = getattr(model, "generation_config", None)
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{type(model).__name__} has no decoder_start_token_id in its config")
    prompt = [int(start)]
    if getattr(model.config, "model_type", "") == "whisper":
        if getattr(gen, "is_multilingual", False):
            raise ValueError(
                "healing a multilingual Whisper needs its language and task prompt tokens; only English-only "
                "Whisper checkpoints (*.en) are supported"
            )
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        if no_ts is not None:
            prompt.append(int(no_ts))
    return prompt


def _eos(model: nn.Module) -> int:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = model.config.eos_token_id if eos is None else eos
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def _pad(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return _eos(model) if pad is None else int(pad)


def _encoder_kwargs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = getattr(model, "main_input_name", "input_ids")
    out = {key: batch[key]}
    if "attention_mask" in batch and key != "input_features":  # Whisper's encoder ignores a frame mask
        out["attention_mask"] = batch["attention_mask"]
    return out


@torch.no_grad()
def encoder_outputs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """`model`'s encoder outputs [n, frames, d] over `batches`, in eval mode."""
    encoder = model.get_encoder()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.cat([encoder(**_encoder_kwargs(model, b)).last_hidden_state for b in batches])
    finally:
        for m, flag in flags:
            m.training = flag


def _to_labels(model: nn.Module, generated: torch.Tensor, prompt: list[int]) -> list[list[int]]:
    """Each generated row as prompt + text + end of text (the prompt `generate` returned, if any, and everything after
    the first end of text dropped)."""
    eos = _eos(model)
    rows = []
    for row in generated.tolist():
        if row[: len(prompt)] == prompt:
            row = row[len(prompt) :]
        elif row[:1] == prompt[:1]:
            row = row[1:]
        text = row[: row.index(eos)] if eos in row else row
        rows.append([*prompt, *text, eos])
    return rows


def transcript_budget(model: nn.Module, max_new_tokens: int) -> int:
    """max_new_tokens (>= 1, else a clear error) capped so that a transcript fits the decoder's positions behind its
    prompt, with its end of text."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    positions = getattr(model.config, "max_target_positions", None)
    if positions is None:
        return max_new_tokens
    return min(max_new_tokens, int(positions) - len(decoder_prompt(model)) - 1)


@torch.no_grad()
def encode_cache(
    model: nn.Module,
    batches: Any,
    *,
    max_new_tokens: int = 128,
    logits_dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> EncoderCache:
    """Run `model`'s (the teacher's) encoder once over `batches`, transcribe them greedily from those outputs and keep
    its teacher-forced logits on those transcripts (in `logits_dtype`): the cache every training step reads instead
    of running the teacher again."""
    require_encoder_decoder(model, "encode_cache")
    max_new_tokens = transcript_budget(model, max_new_tokens)
    batches = check_batches(model, batches)
    prompt = decoder_prompt(model)
    from transformers.modeling_outputs import BaseModelOutput

    hidden, labels, masks, logits = [], [], [], []
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="teacher: encode + pseudo-labels", unit="batch")
    try:
        for b in batches:
            kwargs = _encoder_kwargs(model, b)
            out = model.get_encoder()(**kwargs).last_hidden_state  # [b, frames, d]
            extra = {"attention_mask": kwargs["attention_mask"]} if "attention_mask" in kwargs else {}
            generated = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=out),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                **extra,
            )
            rows = _to_labels(model, generated, prompt)
            ids, lengths = _padded(model, rows)
            mask = extra.get("attention_mask")
            teacher = decoder_logits(model, ids, lengths, hidden=out, encoder_mask=mask)  # [b, t-1, v]
            valid = torch.arange(ids.shape[1] - 1)[None] < (lengths[:, None] - 1)
            logits.append(teacher[valid].to(logits_dtype))  # rows after each other
            hidden.append(out)
            labels += rows
            if mask is not None:
                masks.append(mask)
    finally:
        for m, flag in flags:
            m.training = flag
    ids, lengths = _padded(model, labels)
    return EncoderCache(torch.cat(hidden), ids, lengths, torch.cat(logits), torch.cat(masks) if masks else None)


@torch.no_grad()
def with_transcripts(model: nn.Module, batches: Any, *, max_new_tokens: int = 128) -> list[dict[str, torch.Tensor]]:
    """Each batch of encoder inputs with the model's own greedy transcripts as `decoder_input_ids` (prompt + text +
    end of text, right-padded): what a scorer of decoder layers runs the model on (the pseudo-labels the healing
    trains on). `model` is left in the mode it was in."""
    require_encoder_decoder(model, "with_transcripts")
    max_new_tokens = transcript_budget(model, max_new_tokens)
    batches = check_batches(model, batches)
    prompt = decoder_prompt(model)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = []
        for b in batches:
            generated = model.generate(**b, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
            ids, _ = _padded(model, _to_labels(model, generated, prompt))
            out.append({**b, "decoder_input_ids": ids})
        return out
    finally:
        for m, flag in flags:
            m.training = flag


def _padded(model: nn.Module, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as right-padded ids [n, t] and their lengths [n]."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), _pad(model), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def decoder_logits(
    model: nn.Module,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    encoder_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits [b, t-1, vocab] of `model`'s decoder teacher-forced on labels[:, :-1], reading either cached
    encoder outputs `hidden` [b, frames, d] or running the encoder on `inputs` (what the cache saves)."""
    from transformers.modeling_outputs import BaseModelOutput

    t = labels.shape[1]
    mask = (torch.arange(t - 1, device=labels.device)[None] < (lengths[:, None] - 1)).long()  # [b, t-1]
    kwargs: dict[str, Any] = {"decoder_input_ids": labels[:, :-1], "decoder_attention_mask": mask, "use_cache": False}
    if hidden is not None:
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden)
        if encoder_mask is not None:
            kwargs["attention_mask"] = encoder_mask
    else:
        kwargs.update(_encoder_kwargs(model, inputs))
    return model(**kwargs).logits


def seq2seq_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher || student) * temperature**2, NLL of the pseudo-labels), both averaged over the predicted positions
    of every row (padding excluded); logits [b, t-1, vocab] predict labels[:, 1:] [b, t-1]."""
    valid = torch.arange(labels.shape[1] - 1, device=labels.device)[None] < (lengths[:, None] - 1)  # [b, t-1]
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [b, t-1, v]
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [b, t-1, v]
    kl = ((t.exp() * (t - s)).sum(-1) * valid).sum() / valid.sum() * temperature**2
    nll = nn.functional.cross_entropy(student_logits[valid].float(), labels[:, 1:][valid])
    return kl, nll


class _Seq2SeqDistillLoss(nn.Module):
    """The student plus the loss, one module DDP can wrap; the teacher's logits come cached with the batch."""

    def __init__(self, student: nn.Module, temperature: float, nll_weight: float):
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.nll_weight = nll_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels, lengths, mask = batch["labels"], batch["lengths"], batch.get("encoder_mask")
        student = decoder_logits(self.student, labels, lengths, hidden=batch["student_hidden"], encoder_mask=mask)
        kl, nll = seq2seq_distill_loss(student, batch["teacher_logits"], labels, lengths, self.temperature)
        return {"loss": kl + self.nll_weight * nll, "kl": kl.detach(), "nll": nll.detach()}


@dataclasses.dataclass
class Seq2SeqDistillResult:
    """What a healing run did: examples, target tokens per epoch, steps, the loss per epoch (mean loss, KL, NLL),
    the loss per step, seconds spent caching the encoder and training. model: the healed model (not in to_dict)."""

    plan: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    temperature: float
    nll_weight: float
    examples: int
    tokens_per_epoch: int
    steps: int
    trained_parameters: int
    num_processes: int
    epoch_losses: list[dict[str, Any]]
    history: list[float]
    cache_seconds: float
    train_seconds: float
    output_dir: str | None = None
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def decoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What healing trains: every parameter of the decoder layers and of the decoder's final norm (not the encoder,
    the embeddings or the head)."""
    adapter = get_adapter(model)
    spec = adapter.stack("decoder")
    modules = list(get_path(backbone(model), spec.layers))
    norm = adapter.final_norm(model, "decoder")
    if norm is not None:
        modules.append(norm)
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def distill_seq2seq(
    model: nn.Module,
    plan: LayerPlan | str,
    batches: Any = None,
    *,
    cache: EncoderCache | None = None,
    epochs: int = 4,
    lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    nll_weight: float = 0.8,
    max_new_tokens: int = 128,
    warmup: float = 0.1,
    start: nn.Module | None = None,
    **run_kwargs: Unpack[RunKwargs],
) -> Seq2SeqDistillResult:
    """Prune a copy of the encoder-decoder `model` by `plan` and train its decoder to match `model` on `batches`
    (encoder inputs, see `check_batches`) or on a ready `cache` (`encode_cache(model, batches)`: several plans can
    share one), the encoder frozen and read from the cache. Returns the result with the healed model.

    nll_weight 0.8 with KL weight 1 is distil-whisper's mix; lr 1e-4 its order of magnitude for the decoder.
    start: a model already running `plan` (an earlier stage's) to train from; not modified either."""
    import time

    run_kwargs.setdefault("progress", False)
    require_encoder_decoder(model, "distillation healing of an encoder-decoder")
    if epochs < 0 or batch_size < 1 or not lr > 0 or not temperature > 0 or nll_weight < 0:
        raise ValueError(
            f"need epochs >= 0, batch_size >= 1, lr > 0, temperature > 0, nll_weight >= 0; got {epochs}, "
            f"{batch_size}, {lr}, {temperature}, {nll_weight}"
        )
    if batches is None and cache is None:
        raise ValueError(
            "give calibration batches (encoder inputs), or a cache from encode_cache (and the batches it was made from)"
        )
    plan = LayerPlan.parse(plan) if isinstance(plan, str) else plan
    student = apply_plan(model, plan)  # checks the plan with clear errors; a copy
    sizes = layer_sizes(model)
    resolved = plan.resolve(sizes)
    if resolved.is_identity(sizes):
        raise ValueError(f"the plan {resolved} keeps every layer: there is nothing to heal")
    if any(len(set(layers)) != len(layers) for layers in resolved.stacks.values()):
        raise ValueError(f"the plan {resolved} repeats a layer; healing would train shared weights twice")
    if start is not None:
        kept = {name: len(layers) for name, layers in resolved.stacks.items()}
        if type(start) is not type(model) or layer_sizes(start) != kept:
            raise ValueError(
                f"distill: start must be a {type(model).__name__} running the plan {resolved} (layers per stack "
                f"{kept}); got a {type(start).__name__} with {layer_sizes(start)}"
            )
        student = copy.deepcopy(start)
    t0 = time.perf_counter()
    if cache is None:
        batches = check_batches(model, batches)
        cache = encode_cache(model, batches, max_new_tokens=max_new_tokens, progress=run_kwargs.get("progress", False))
    elif not isinstance(cache, EncoderCache):
        raise ValueError(f"cache must be an EncoderCache (from encode_cache), got {type(cache).__name__}")
    # the student's own encoder outputs, when the plan changes the encoder (frozen as well: computed once)
    student_hidden = None
    if list(resolved.stacks.get("encoder", [])) != list(range(sizes.get("encoder", 0))):
        if batches is None:
            raise ValueError(f"the plan {resolved} prunes the encoder: give the batches too, to encode them with it")
        student_hidden = encoder_outputs(student, batches)
    cache_seconds = time.perf_counter() - t0

    params = decoder_parameters(student)
    loss = _Seq2SeqDistillLoss(student, temperature, nll_weight)
    run = train(
        loss,
        params,
        torch.arange(len(cache)),
        collate=lambda rows: cache.rows(torch.stack(rows), student_hidden),
        epochs=epochs,
        lr=lr,
        warmup=warmup,
        train_mode=False,  # eval mode: no dropout in student or teacher
        batch_size=batch_size,
        seed=seed,
        fingerprint={
            "healer": "distill",
            "kind": "encoder-decoder",
            "plan": resolved.to_text(),
            "examples": len(cache),
        },
        desc="distill heal (frozen encoder)",
        **run_kwargs,
    )
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)  # as after from_pretrained
    result = Seq2SeqDistillResult(
        plan=resolved.to_text(),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        temperature=temperature,
        nll_weight=nll_weight,
        examples=len(cache),
        tokens_per_epoch=cache.tokens,
        steps=run.global_step,
        trained_parameters=sum(p.numel() for p in params),
        cache_seconds=round(cache_seconds, 2),
        **run.record(),
        model=student,
    )
    record = {k: v for k, v in result.to_dict().items() if k not in ("history", "output_dir")}
    setattr(student.config, RECORD_KEY, {"method": "distill", "encoder": "frozen, cached", **record})
    return result


def heal(model: nn.Module, plan: LayerPlan | str, batches: Any, *, progress: bool = False, **options: Any) -> nn.Module:
    """The healer interface for encoder-decoders (reached through `distill`): the healed model of `distill_seq2seq`."""
    check_options("distill", distill_seq2seq, options, extra=RunKwargs.__annotations__)
    return distill_seq2seq(model, plan, batches, progress=progress, **options).model


__all__ = [
    "EncoderCache",
    "Seq2SeqDistillResult",
    "check_batches",
    "decoder_logits",
    "decoder_parameters",
    "decoder_prompt",
    "distill_seq2seq",
    "encode_cache",
    "encoder_outputs",
    "heal",
    "require_encoder_decoder",
    "seq2seq_distill_loss",
    "transcript_budget",
    "with_transcripts",
]
