"""Datasets, temporal splits, legacy rankers and slates."""
