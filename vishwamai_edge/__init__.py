"""vishwamai-edge: from a workstation model to an edge device bundle."""

__version__ = "0.1.0"
