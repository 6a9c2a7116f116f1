"""One shallow family of errors; third-party exceptions are translated at their boundary."""

from __future__ import annotations


class UnsError(Exception):
    """Base of every error this package raises on purpose."""


class TopicError(UnsError, ValueError):
    """A topic, filter or namespace level is not valid."""


class PayloadError(UnsError, ValueError):
    """A payload does not decode into the contract; the message says where (``at $.x``)."""


class ConfigError(UnsError):
    """A configuration value is missing or wrong; the message names the field."""


class BusError(UnsError):
    """The broker cannot be reached or the connection was lost."""


class Reject(UnsError):
    """Raised by a handler to drop the message it was given, counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
