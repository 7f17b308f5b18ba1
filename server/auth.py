"""Passwords (scrypt), signed tokens for agents and visitors, and host-site identities.

A token is ``<base64url(json payload)>.<base64url(HMAC-SHA256(secret, payload))>``; the
payload names its kind (``agent``/``visitor``), subject and expiry, and an agent token the
agent's ``token_version`` so that a password change revokes every older token.
Tokens travel in frames and headers only, never in URLs, and are never logged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

from .errors import Unauthorized

# scrypt parameters (RFC 7914 interactive): N=2**14, r=8, p=1 -> 16 MiB, ~50 ms.
_N, _R, _P, _DKLEN = 2 ** 14, 8, 1, 32


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("password is empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Strict: only the URL-safe alphabet, and only the one canonical spelling of the bytes
    (the standard decoder skips other characters, so ``ab*c`` read as ``abc``: one signature
    had many spellings)."""
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not URL-safe base64")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64 of its bytes")
    return data


_B64 = re.compile(r"[A-Za-z0-9_-]*")


class Tokens:
    """Issues and checks HMAC-signed tokens with one secret key."""

    def __init__(self, key: bytes, *, agent_ttl_s: float, visitor_ttl_s: float) -> None:
        self._key = key
        self.agent_ttl_s = agent_ttl_s
        self.visitor_ttl_s = visitor_ttl_s

    def _sign(self, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        sig = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(sig)}"

    def _open(self, token: Any, kind: str, now: float | None = None) -> dict[str, Any]:
        if not isinstance(token, str) or not token.isascii() or token.count(".") != 1 or len(token) > 2048:
            raise Unauthorized("missing or malformed token")
        body, sig = token.split(".")
        expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        try:
            given = _unb64(sig)
        except ValueError:
            raise Unauthorized("malformed token") from None
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("bad token signature")
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            raise Unauthorized("malformed token") from None
        if not isinstance(payload, dict) or payload.get("k") != kind:
            raise Unauthorized(f"not a {kind} token")
        if float(payload.get("exp", 0)) < (time.time() if now is None else now):
            raise Unauthorized("token expired")
        return payload

    def agent_token(self, agent_id: str, token_version: int, ttl_s: float | None = None) -> str:
        exp = time.time() + (self.agent_ttl_s if ttl_s is None else ttl_s)
        return self._sign({"k": "agent", "sub": agent_id, "ver": token_version, "exp": exp})

    def open_agent(self, token: Any) -> tuple[str, int]:
        agent_id, version, _ = self.open_agent_claims(token)
        return agent_id, version

    def open_agent_claims(self, token: Any) -> tuple[str, int, float]:
        """(agent id, token version, expiry as unix time) of a valid agent token."""
        payload = self._open(token, "agent")
        return str(payload["sub"]), int(payload.get("ver", 0)), float(payload.get("exp", 0.0))

    def visitor_token(self, visitor_id: str, ttl_s: float | None = None, verified: str | None = None) -> str:
        exp = time.time() + (self.visitor_ttl_s if ttl_s is None else ttl_s)
        payload: dict[str, Any] = {"k": "visitor", "sub": visitor_id, "exp": exp}
        if verified:
            payload["ext"] = verified
        return self._sign(payload)

    def open_visitor(self, token: Any) -> tuple[str, str | None]:
        payload = self._open(token, "visitor")
        return str(payload["sub"]), payload.get("ext")

    def verified_visitor_id(self, external_id: str) -> str:
        """The same host-site user always maps to the same visitor id (and only they do)."""
        return "u" + hmac.new(self._key, b"visitor:" + external_id.encode(), hashlib.sha256).hexdigest()[:31]


def new_visitor_id() -> str:
    return "v" + secrets.token_hex(16)


def check_identity(secret: str, identity: Any, *, max_age_s: float, now: float | None = None) -> str:
    """A host site's signed visitor identity: ``{"id": ..., "ts": unix seconds, "hash": hex}`` where
    ``hash = HMAC-SHA256(identity_secret, f"{id}:{ts}")`` (``ts`` may be omitted when the server's
    ``identity_max_age_s`` is 0, and the message is then just ``id``).  Returns the id, or raises
    Unauthorized; the caller changes nothing on failure."""
    if not secret:
        raise Unauthorized("signed identities are not enabled on this server")
    if not isinstance(identity, dict):
        raise Unauthorized("identity must be an object")
    ident, ts, given = identity.get("id"), identity.get("ts"), identity.get("hash")
    if not isinstance(ident, str) or not ident or len(ident) > 200 or not isinstance(given, str):
        raise Unauthorized("identity needs id and hash")
    message = ident if ts is None else f"{ident}:{ts}"
    expected = hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.lower().encode(), expected.encode()):
        raise Unauthorized("bad identity signature")
    if max_age_s:
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise Unauthorized("identity needs a timestamp (ts)")
        if abs((time.time() if now is None else now) - float(ts)) > max_age_s:
            raise Unauthorized("identity timestamp outside the accepted window")
    return ident
