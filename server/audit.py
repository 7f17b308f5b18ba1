"""Audit entries for refused cross-team actions (THREATS.md row 14).

Each entry is one log record on the ``kefu.audit`` logger (level WARNING) and one count of
``kefu_audit_total{action=...}``.  The record's message names who, what and which
conversation; the same fields sit on the record as ``record.audit`` (a dict) for structured
handlers.  docs/operations.md (Monitoring) describes both.
"""
from __future__ import annotations

import logging
from typing import Any

from .metrics import Metrics

log = logging.getLogger("kefu.audit")


def audit(metrics: Metrics, action: str, *, agent: str, conversation: str, **detail: Any) -> None:
    """Record a refused action: ``action`` is ``accept``, ``transfer`` or ``read``."""
    metrics.inc("kefu_audit_total", action=action)
    fields = {"action": action, "agent": agent, "conversation": conversation, "outcome": "refused", **detail}
    extra = " ".join(f"{k}={v}" for k, v in detail.items())
    log.warning("audit: %s refused: agent=%s conversation=%s%s", action, agent, conversation,
                " " + extra if extra else "", extra={"audit": fields})
