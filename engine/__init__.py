"""dgls engine: the resident process that owns a DiffusionGemma model and answers "fill this gap".

Importing this package (and `engine.fill`, `engine.protocol`, `engine.client`) never imports torch, so the
language server can talk to the engine without loading a deep-learning stack. The modules that need torch
(`loading`, `prompt_cache`, `denoiser`, `engine`, `scheduler`, `server`) are imported only by the engine
process itself.
"""

__all__: list[str] = []
