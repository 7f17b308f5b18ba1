"""Train, export and evaluate kefu's intent model.

This package is the only place that imports torch and transformers, and only inside
``train`` and ``export``; the engine serves the result with ONNX Runtime alone
(:mod:`engine.onnx_intent`).  The pipeline is ``models.pipeline.train_model``:
data -> fine-tune -> calibrate (kNN bank, out-of-scope threshold) -> ONNX -> int8 ->
agreement checks -> evaluation report.  See docs/model.md.
"""
