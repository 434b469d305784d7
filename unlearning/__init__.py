"""Make a language model forget specific knowledge, and prove it is gone."""

__version__ = "0.1.0"
