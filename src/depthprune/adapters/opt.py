"""OPT."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="opt",
        model_types=("opt",),
        stacks=(
            StackSpec(
                name="decoder",
                layers="decoder.layers",
                index_attrs=("self_attn.layer_idx",),
                depth_fields=(ConfigField("num_hidden_layers"),),
                final_norm="decoder.final_layer_norm",
                final_proj="decoder.project_out",
            ),
        ),
        heads=("lm_head", "score"),
    )
]
