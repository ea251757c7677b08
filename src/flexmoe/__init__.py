"""flexmoe: FlexOlmo-style language models with privately trained, removable experts."""

__version__ = "0.1.0"
