"""pynbd: a network block device stack in Python."""

__version__ = "0.1.0"
