"""Dynamic layer skipping: learned routers decide, per token (decoders) or per sample (encoders), whether each layer
runs; a skipped layer passes its input on unchanged and the next layer goes on from there.

- `routers/`: one file per router kind (registered in depthprune.registry.ROUTER_KINDS), what they share in
  `routers/__init__.py` (config, the model they were built for, `build_routers`).
- `dense.py`: the teacher-forced routed pass (every layer computed, decisions mixed in): training and perplexity.
- `train.py`: router training through depthprune.training (KL to the untouched model + a compute term).
- `inference.py`: batched inference where skipping rows are not computed: `skip_generate`, `RoutedClassifier`.
- `calibrate.py`: the router threshold by Learn-then-Test.
- `io.py`: saving and loading routers beside a model.
"""
