"""Wire format of the WebSocket protocol (documented in docs/protocol.md).

Frames are JSON objects with a ``type``; msgpack maps when the client negotiated the
``kefu.msgpack`` subprotocol.  This module decodes and checks client frames (so handlers
receive well-typed dicts or a :class:`FrameError` with a stable code) and encodes server
frames.  It knows nothing of connections or storage.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import msgpack
from engine import KefuError

MSGPACK = "kefu.msgpack"
SUBPROTOCOLS = [MSGPACK]

# Close codes (also in docs/protocol.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_DATA = 1007      # invalid UTF-8 in a text frame (sent by the WebSocket layer)
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009           # frame over max_frame_bytes (sent by the WebSocket layer)
CLOSE_INTERNAL = 1011
CLOSE_IDLE = 4000              # heartbeat not answered
CLOSE_UNAUTHORIZED = 4001      # no hello in time, bad/expired token, bad identity
CLOSE_REVOKED = 4002           # the agent's password changed (token revoked)
CLOSE_NOT_FOUND = 4004         # hello named an unknown or foreign conversation
CLOSE_SLOW = 4008              # the client did not read fast enough (send queue full)
CLOSE_TOO_MANY_ERRORS = 4009   # max_errors protocol errors
CLOSE_RATE_LIMITED = 4029      # flood (5 refusals within 10 s) or too many new conversations

# Error-frame codes.
BAD_JSON = "bad_json"
BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
TEXT_TOO_LONG = "text_too_long"
EMPTY_TEXT = "empty_text"
RATE_LIMITED = "rate_limited"
NOT_FOUND = "not_found"
BAD_STATE = "bad_state"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"           # an action outside the agent's team (audited)
NOT_HELLO = "hello_required"
STORAGE = "storage_unavailable"
INTERNAL = "internal"

MAX_DEPTH = 4


class FrameError(KefuError):
    """A client frame that cannot be served: answered with an error frame carrying ``code``."""

    status_code = 400

    def __init__(self, code: str, message: str, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.client_id = code, client_id


class Codec:
    """Encoder/decoder for one connection's format."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary
        self.encode: Callable[[dict[str, Any]], str | bytes] = _mp_encode if binary else _json_encode

    def decode(self, data: str | bytes) -> dict[str, Any]:
        try:
            if self.binary:
                if isinstance(data, str):
                    raise FrameError(BAD_FRAME, "this connection speaks msgpack: send binary frames")
                frame = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
            else:
                if isinstance(data, (bytes, bytearray)):
                    data = bytes(data).decode("utf-8")
                frame = json.loads(data, parse_constant=_reject_constant, parse_float=_finite)
        except FrameError:
            raise
        except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as exc:
            raise FrameError(BAD_JSON, f"frame is not valid {'msgpack' if self.binary else 'JSON'}: "
                                       f"{str(exc)[:120]}") from None
        if not isinstance(frame, dict):
            raise FrameError(BAD_FRAME, "a frame must be an object with a type")
        if _depth(frame) > MAX_DEPTH:
            raise FrameError(BAD_FRAME, "frame nested too deeply")
        ftype = frame.get("type")
        if not isinstance(ftype, str):
            raise FrameError(MISSING_FIELD, "frame has no type")
        return frame


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _json_encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _mp_encode(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max([level] + [_depth(v, level + 1) for v in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(v, level + 1) for v in value])
    return level


# -- field access with stable error codes ------------------------------------------------

def get_str(frame: dict[str, Any], name: str, *, required: bool = True, max_len: int = 200,
            default: str | None = None) -> str | None:
    value = frame.get(name)
    if value is None:
        if required:
            raise FrameError(MISSING_FIELD, f"{name!r} is required", _cid(frame))
        return default
    if not isinstance(value, str):
        raise FrameError(BAD_FIELD, f"{name!r} must be a string", _cid(frame))
    if len(value) > max_len:
        raise FrameError(BAD_FIELD, f"{name!r} is longer than {max_len}", _cid(frame))
    if "\x00" in value:
        raise FrameError(BAD_FIELD, f"{name!r} contains a NUL character", _cid(frame))
    return value


def get_int(frame: dict[str, Any], name: str, *, required: bool = True, default: int | None = None,
            minimum: int = 0, maximum: int = 2 ** 53) -> int | None:
    value = frame.get(name)
    if value is None:
        if required:
            raise FrameError(MISSING_FIELD, f"{name!r} is required", _cid(frame))
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise FrameError(BAD_FIELD, f"{name!r} must be an integer in [{minimum}, {maximum}]", _cid(frame))
    return value


def get_bool(frame: dict[str, Any], name: str, default: bool) -> bool:
    value = frame.get(name, default)
    if not isinstance(value, bool):
        raise FrameError(BAD_FIELD, f"{name!r} must be true or false", _cid(frame))
    return value


def get_text(frame: dict[str, Any], max_chars: int) -> str:
    text = frame.get("text")
    if text is None:
        raise FrameError(MISSING_FIELD, "'text' is required", _cid(frame))
    if not isinstance(text, str):
        raise FrameError(BAD_FIELD, "'text' must be a string", _cid(frame))
    if len(text) > max_chars:
        raise FrameError(TEXT_TOO_LONG, f"text is {len(text)} characters; the limit is {max_chars}", _cid(frame))
    if "\x00" in text:
        raise FrameError(BAD_FIELD, "text contains a NUL character", _cid(frame))
    if not text.strip():
        raise FrameError(EMPTY_TEXT, "text is empty", _cid(frame))
    return text


def _cid(frame: dict[str, Any]) -> str | None:
    cid = frame.get("id")
    return cid if isinstance(cid, str) and len(cid) <= 64 else None


def error_frame(code: str, message: str, client_id: str | None = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id is not None:
        frame["id"] = client_id
    frame.update(extra)
    return frame
