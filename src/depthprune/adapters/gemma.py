"""Gemma 3 text decoders: a sliding/global attention mix described per layer by `config.layer_types`."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="gemma3",
        model_types=("gemma3_text",),
        stacks=(
            StackSpec(
                name="decoder",
                layers="layers",
                index_attrs=("layer_idx", "self_attn.layer_idx"),
                depth_fields=(ConfigField("num_hidden_layers"), ConfigField("layer_types", per_layer=True)),
                final_norm="norm",
                kv_layout="rotary",
                sublayers="sandwich",
            ),
        ),
        heads=("lm_head", "score"),
    ),
    Adapter(
        family="gemma3-multimodal",
        model_types=("gemma3",),
        stacks=(
            StackSpec(
                name="decoder",
                layers="language_model.layers",
                index_attrs=("layer_idx", "self_attn.layer_idx"),
                depth_fields=(
                    ConfigField("num_hidden_layers", owner="language_model"),
                    ConfigField("layer_types", owner="language_model", per_layer=True),
                ),
                final_norm="language_model.norm",
                kv_layout="rotary",
                sublayers="sandwich",
            ),
        ),
        heads=("lm_head",),
    ),
]
