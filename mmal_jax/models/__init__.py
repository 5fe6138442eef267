"""Image, text and feature towers, the two-tower model, checkpoints, presets."""
