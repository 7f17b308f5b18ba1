"""Hand-written Prometheus metrics (text exposition format 0.0.4)."""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Callable

# Seconds; ack latency = from a client frame's arrival to its ack being queued.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = ACK_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(lambda: defaultdict(float))
        self.ack_latency = Histogram()
        self.gauges: dict[str, Callable[[], float]] = {}
        self.help: dict[str, str] = {
            "kefu_messages_stored_total": "Messages stored, by role.",
            "kefu_bot_turns_total": "Bot turns, by outcome (answered, handoff, timeout, error).",
            "kefu_connections_opened_total": "WebSocket connections opened, by kind.",
            "kefu_connections_closed_total": "WebSocket connections closed by the server, by close code.",
            "kefu_frames_rejected_total": "Client frames answered with an error frame, by code.",
            "kefu_handoffs_total": "Conversations handed to a person, by outcome.",
            "kefu_http_rejected_total": "HTTP requests and upgrades refused, by reason.",
            "kefu_audit_total": "Audited refusals of cross-team actions, by action (accept, transfer, read).",
        }

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def gauge(self, name: str, fn: Callable[[], float], help_text: str) -> None:
        self.gauges[name] = fn
        self.help[name] = help_text

    def render(self) -> str:
        out: list[str] = []
        for name in sorted(self.counters):
            out.append(f"# HELP {name} {self.help.get(name, name)}")
            out.append(f"# TYPE {name} counter")
            for labels, value in sorted(self.counters[name].items()):
                out.append(f"{name}{_labels(labels)} {_num(value)}")
        for name in sorted(self.gauges):
            try:
                value = float(self.gauges[name]())
            except Exception:
                continue
            out.append(f"# HELP {name} {self.help[name]}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name} {_num(value)}")
        h = self.ack_latency
        out.append("# HELP kefu_ack_latency_seconds From a client message's arrival to its ack (stored).")
        out.append("# TYPE kefu_ack_latency_seconds histogram")
        running = 0
        for bound, count in zip(h.buckets, h.counts):
            running += count
            out.append(f'kefu_ack_latency_seconds_bucket{{le="{bound}"}} {running}')
        out.append(f'kefu_ack_latency_seconds_bucket{{le="+Inf"}} {h.count}')
        out.append(f"kefu_ack_latency_seconds_sum {h.sum:.6f}")
        out.append(f"kefu_ack_latency_seconds_count {h.count}")
        return "\n".join(out) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
