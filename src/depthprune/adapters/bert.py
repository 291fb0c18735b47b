"""BERT-style encoders: BERT (and MiniLM, which is a BERT), RoBERTa, XLM-RoBERTa."""

from depthprune.adapters.base import Adapter, ConfigField, StackSpec

ADAPTERS = [
    Adapter(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert"),
        stacks=(
            StackSpec(
                name="encoder",
                layers="encoder.layer",
                index_attrs=("attention.self.layer_idx", "crossattention.self.layer_idx", "layer_idx"),
                depth_fields=(ConfigField("num_hidden_layers"),),
            ),
        ),
        heads=("classifier", "cls", "lm_head", "qa_outputs"),
    )
]
