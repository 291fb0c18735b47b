"""Encoder-decoder stacks of BART and Whisper (same layout: model.encoder.layers / model.decoder.layers)."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec


def _stacks(encoder_norm: str | None, decoder_norm: str | None) -> tuple[StackSpec, ...]:
    return (
        StackSpec(
            name="encoder",
            layers="encoder.layers",
            index_attrs=("self_attn.layer_idx",),
            depth_fields=(ConfigField("encoder_layers"),),
            final_norm=encoder_norm,
        ),
        StackSpec(
            name="decoder",
            layers="decoder.layers",
            index_attrs=("self_attn.layer_idx", "encoder_attn.layer_idx"),
            depth_fields=(ConfigField("decoder_layers"),),
            final_norm=decoder_norm,
        ),
    )


ADAPTERS = [
    Adapter(
        family="bart",
        model_types=("bart",),
        stacks=_stacks(None, None),
        heads=("lm_head", "classification_head", "qa_outputs"),
    ),
    Adapter(
        family="whisper",
        model_types=("whisper",),
        stacks=_stacks("encoder.layer_norm", "decoder.layer_norm"),
        heads=("proj_out", "classifier"),
    ),
]
