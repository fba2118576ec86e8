"""dgls: a code-completion language server whose model is a text-diffusion LM (DiffusionGemma).

This package is the editor-facing side: the CLI and the language server. It never imports torch; the model
lives in the resident engine process (package `engine`), reached over a local socket.
"""

__version__ = "0.1.0"
