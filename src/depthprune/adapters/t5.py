"""T5 encoder and decoder stacks.

T5 keeps each stack's learned relative position bias inside its first block only; the stack computes the bias there
and hands it to every later block. After a plan, the new first block receives the stack's bias module (so the
model keeps its position information whichever source layer now comes first) and the other blocks drop theirs,
exactly as a freshly built T5 of the new depth is laid out, so the export loads in plain transformers.
"""

from torch import nn

from depthprune.adapters.base import Adapter, ConfigField, StackSpec


def _move_position_bias(model: nn.Module, stack: StackSpec, source_layers: list[nn.Module], _: list[int]) -> None:
    from depthprune.adapters.base import backbone, get_path

    bias = source_layers[0].layer[0].SelfAttention.relative_attention_bias
    for pos, block in enumerate(get_path(backbone(model), stack.layers)):
        attn = block.layer[0].SelfAttention
        if pos == 0:
            attn.has_relative_attention_bias = True
            attn.relative_attention_bias = bias
        else:
            attn.has_relative_attention_bias = False
            if "relative_attention_bias" in attn._modules:
                del attn.relative_attention_bias


ADAPTERS = [
    Adapter(
        family="t5",
        model_types=("t5", "mt5"),
        stacks=(
            StackSpec(
                name="encoder",
                layers="encoder.block",
                index_attrs=("layer.0.SelfAttention.layer_idx",),
                depth_fields=(ConfigField("num_layers"), ConfigField("num_layers", owner="encoder")),
                final_norm="encoder.final_layer_norm",
            ),
            StackSpec(
                name="decoder",
                layers="decoder.block",
                index_attrs=("layer.0.SelfAttention.layer_idx", "layer.1.EncDecAttention.layer_idx"),
                depth_fields=(ConfigField("num_decoder_layers"), ConfigField("num_layers", owner="decoder")),
                final_norm="decoder.final_layer_norm",
            ),
        ),
        heads=("lm_head", "classification_head", "qa_outputs"),
        post_apply=_move_position_bias,
    )
]
