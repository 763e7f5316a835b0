"""ONNX export of every part, streamed one layer at a time."""
