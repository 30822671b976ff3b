"""vtn: Video Transformer Network as a two-stage feature cache."""

__version__ = "0.1.0"
