"""Where weights come from and how they sit on disk: sources (HF, GGUF, synthetic), conversion, the layer store and its cache."""
