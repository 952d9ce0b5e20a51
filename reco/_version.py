"""The version of reco (one place, below every room)."""

__version__ = "0.1.0"
