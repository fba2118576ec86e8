"""Training the embedded default model (see README.md in this folder); never imported by the engine."""
