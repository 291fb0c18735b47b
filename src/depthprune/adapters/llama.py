"""Llama-style decoders: Llama (SmolLM2), Mistral, Qwen2, Phi3 share one layout (Phi3 fuses q/k/v into one
projection, so its keys/values cannot be computed without its queries: no kv_layout; its sub-layers carry their own
dropouts and are not split)."""

import dataclasses

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

DECODER = StackSpec(
    name="decoder",
    layers="layers",
    index_attrs=("self_attn.layer_idx", "layer_idx"),
    depth_fields=(ConfigField("num_hidden_layers"), ConfigField("layer_types", per_layer=True)),
    final_norm="norm",
    output_proj="mlp.down_proj",
    kv_layout="rotary",
    sublayers="pre_norm",
)

ADAPTERS = [
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2"),
        stacks=(DECODER,),
        heads=("lm_head", "score", "qa_outputs"),
    ),
    Adapter(
        family="phi3",
        model_types=("phi3",),
        stacks=(dataclasses.replace(DECODER, kv_layout=None, sublayers=None),),
        heads=("lm_head", "score", "qa_outputs"),
    ),
]
