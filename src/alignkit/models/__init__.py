"""Models: load/build (aliases, GGUF conversion, tiny test models) and response log-prob computation."""
