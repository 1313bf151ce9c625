"""Shared NNX building blocks: every family is assembled from these."""
