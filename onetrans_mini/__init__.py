"""onetrans-mini: OneTrans, the unified Transformer for industrial ranking, small enough to read."""

__version__ = "0.1.0"
