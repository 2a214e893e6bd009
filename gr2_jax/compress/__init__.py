"""The context compressor: a decoder that rewrites a user's history into a short summary the
re-ranking prompt shows instead, trained by GRPO on compression and quality rewards."""
