"""Outbound delivery: transport path (direct or proxied), MX resolution, scheduling."""

from ferrymail.delivery.connect import ProxyRoute, Source, Timeouts, open_socket, open_stream
from ferrymail.delivery.errors import DeliveryError, SMTPReplyError
from ferrymail.delivery.mx import MXHost, Resolver

__all__ = [
    "DeliveryError",
    "MXHost",
    "ProxyRoute",
    "Resolver",
    "SMTPReplyError",
    "Source",
    "Timeouts",
    "open_socket",
    "open_stream",
]
