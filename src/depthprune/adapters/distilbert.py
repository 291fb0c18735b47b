"""DistilBERT."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="distilbert",
        model_types=("distilbert",),
        stacks=(
            StackSpec(
                name="encoder",
                layers="transformer.layer",
                depth_fields=(ConfigField("num_hidden_layers"),),
                module_depth_attrs=("transformer.n_layers",),
            ),
        ),
        heads=("classifier", "vocab_projector", "qa_outputs"),
    )
]
