"""How a fetch can fail: a :class:`FetchError` is a typed rejection that also says whether to try again."""

from __future__ import annotations

from worker.errors import RejectedRecord, RejectReason

# The outcome label of a fetch that brought back bytes; failures are labelled with their reason.
OK = "ok"


class FetchError(RejectedRecord):
    """A reference that could not be fetched. ``retriable`` failures (timeouts, 5xx, throttling, dropped
    connections) are tried again; ``retry_after_s`` is the server's own hint, when it gave one.

    The message never holds credentials: it names the reference only through
    :func:`worker.fetching.uri.redact`.
    """

    def __init__(
        self, reason: RejectReason, message: str, retriable: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(reason, message)
        self.retriable = retriable
        self.retry_after_s = retry_after_s


def forbidden(message: str) -> FetchError:
    """Refused by policy (scheme, address, root) or by the store (401/403, AccessDenied)."""
    return FetchError(RejectReason.FETCH_FORBIDDEN, message)


def not_found(message: str) -> FetchError:
    """Nothing at that reference."""
    return FetchError(RejectReason.FETCH_NOT_FOUND, message)


def too_large(message: str) -> FetchError:
    """The object is larger than the image byte limit."""
    return FetchError(RejectReason.FETCH_TOO_LARGE, message)


def timed_out(message: str) -> FetchError:
    """No complete answer in time; worth another try."""
    return FetchError(RejectReason.FETCH_TIMEOUT, message, retriable=True)


def failed(message: str, retriable: bool = False, retry_after_s: float | None = None) -> FetchError:
    """Any other failure."""
    return FetchError(RejectReason.FETCH_FAILED, message, retriable, retry_after_s)
