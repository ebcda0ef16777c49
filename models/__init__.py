"""The embedded default registry (registry.json and its ONNX files): package data, no code."""
