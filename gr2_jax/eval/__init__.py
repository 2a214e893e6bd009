"""Ranking metrics, confidence intervals and evaluation tables."""
