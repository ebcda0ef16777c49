"""The deploy path: a NIfTI image in, masks on its own grid out (ONNX Runtime; no torch)."""
