"""Decoder LLMs and their checkpoint I/O."""
