"""Server errors: each carries its HTTP status and a stable ``code`` (also used in error frames).

Every kefu error has one root, engine's :class:`~engine.KefuError`: these, and
:class:`~server.storage.StorageError` (503, ``storage_unavailable``),
:class:`~server.routing.RoutingError` and :class:`~server.protocol.FrameError`, so one handler
maps each to a response (server/api.py) and to an error frame (server/sessions.py).
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


class TooLarge(ServerError):
    status_code = 413
    code = "too_large"


class RateLimited(ServerError):
    status_code = 429
    code = "rate_limited"
