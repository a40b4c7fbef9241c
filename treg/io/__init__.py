"""Data on disk: formats, the dataset contract, shards, atomic writes, stage metadata."""
