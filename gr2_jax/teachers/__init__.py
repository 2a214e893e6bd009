"""Teachers that write ranked, explained answers for the re-ranking SFT data."""
