"""Llama-style decoders: Llama (SmolLM2), Mistral, Qwen2, Phi3 share one layout."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

DECODER = StackSpec(
    name="decoder",
    layers="layers",
    index_attrs=("self_attn.layer_idx", "layer_idx"),
    depth_fields=(ConfigField("num_hidden_layers"), ConfigField("layer_types", per_layer=True)),
    final_norm="norm",
    output_proj="mlp.down_proj",
)

ADAPTERS = [
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "phi3"),
        stacks=(DECODER,),
        heads=("lm_head", "score", "qa_outputs"),
    )
]
