"""memgpt: memory-augmented transformer layers for PyTorch."""
