"""Errors a client caused or can act on, each with its HTTP status and a stable `type` string.

They are raised anywhere in the app (the language model replica included), cross replica boundaries
inside Ray's task errors, and the gateway turns them into `{"error": {"type", "message"}}` responses.
"""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    type = "internal_error"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.type

    @property
    def param(self) -> str | None:
        """The request field at fault, when there is one: raise SomeError("...", "field")."""
        return self.args[1] if len(self.args) > 1 else None


class InvalidRequest(ServeError):
    status, type = 400, "invalid_request"


class Unauthorized(ServeError):
    status, type = 401, "unauthorized"


class NotFound(ServeError):
    status, type = 404, "not_found"


class MethodNotAllowed(ServeError):
    status, type = 405, "method_not_allowed"


class InputTooLong(ServeError):
    status, type = 413, "input_too_long"


class Overloaded(ServeError):
    status, type = 503, "overloaded"


class ModerationUnavailable(ServeError):
    """Moderation could not reach a verdict (an error, a non-finite score). Fails closed: the caller
    gets no verdict at all, never a "safe" that nothing checked."""

    status, type = 503, "moderation_unavailable"


class TimedOut(ServeError):
    status, type = 504, "timeout"


def root_cause(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of the task errors Ray wraps it in at each hop."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
        else:
            break
    return exc
