"""runvisor: keeps script projects running on one machine."""

__version__ = "0.1.0"
