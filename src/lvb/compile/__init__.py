"""tpu-mlir driver: one ONNX net to one bmodel, then a pool, a cache and a combine."""
