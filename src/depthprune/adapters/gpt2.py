"""GPT-2."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        stacks=(
            StackSpec(
                name="decoder",
                layers="h",
                index_attrs=("attn.layer_idx", "crossattention.layer_idx"),
                depth_fields=(ConfigField("num_hidden_layers"),),
                final_norm="ln_f",
                output_proj="mlp.c_proj",  # a Conv1D: weight [in, out]
            ),
        ),
        heads=("lm_head", "score"),
    )
]
