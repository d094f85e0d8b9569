"""temper trainer: runs one post-training stage from a stage contract."""

__version__ = "0.1.0"
