"""The deploy path: image in, masks out (no torch)."""
