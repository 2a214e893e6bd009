"""Text tokenizers, the chat template and its training loss mask."""
