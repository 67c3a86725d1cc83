"""Observability: structured logs (and, later, metrics)."""

from ferrymail.observe.log import configure, enabled, format_event, log_event, quote

__all__ = ["configure", "enabled", "format_event", "log_event", "quote"]
