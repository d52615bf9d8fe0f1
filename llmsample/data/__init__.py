"""Corpora and data sets shipped or loaded by name (CommonGen, Shakespeare)."""

__all__: list[str] = []
