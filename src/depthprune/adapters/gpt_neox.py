"""GPT-NeoX (Pythia). transformers 5 calls the LM head `lm_head` (checkpoints still store it as `embed_out`)."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        stacks=(
            StackSpec(
                name="decoder",
                layers="layers",
                index_attrs=("attention.layer_idx", "layer_idx"),
                depth_fields=(ConfigField("num_hidden_layers"),),
                final_norm="final_layer_norm",
                output_proj="mlp.dense_4h_to_h",  # added to the residual (parallel or not), nothing after it
            ),
        ),
        heads=("lm_head", "embed_out", "score"),  # transformers 5 renamed embed_out to lm_head
    )
]
