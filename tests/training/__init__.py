"""Tests for engine/training: tokenizer, spans, corpus split, training step and export."""
