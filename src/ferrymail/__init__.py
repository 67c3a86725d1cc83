"""ferrymail: a mail transfer agent for proxy tiers."""

__version__ = "0.1.0"
