"""Offline data prep: tokenize, pack and mix corpora into Arrow training files, plus a GeRe replay shard."""

__version__ = "0.1.0"
