"""Re-ranking of slates by a model checkpoint and its evaluation rows."""
