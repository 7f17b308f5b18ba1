"""Server errors: each carries its HTTP status and a stable ``code`` (also used in error frames).

They derive from engine's :class:`~engine.KefuError`, so one handler maps every kefu error
to a response (see server/api.py) and to an error frame (server/chat.py).
"""
from __future__ import annotations

from engine import InputError, KefuError


class ServerError(KefuError):
    status_code = 500
    code = "internal"


class BadRequest(InputError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServerError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServerError):
    status_code = 403
    code = "forbidden"


class NotFound(ServerError, LookupError):
    """Unknown *or foreign*: the caller cannot tell which."""

    status_code = 404
    code = "not_found"


class Conflict(ServerError):
    status_code = 409
    code = "bad_state"


class TooLarge(ServerError):
    status_code = 413
    code = "too_large"


class RateLimited(ServerError):
    status_code = 429
    code = "rate_limited"


class Unavailable(ServerError):
    """Storage failed: nothing was stored, so nothing was acknowledged; retry."""

    status_code = 503
    code = "storage_unavailable"
