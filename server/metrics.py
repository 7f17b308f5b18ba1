"""Hand-written Prometheus metrics (text exposition format 0.0.4)."""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any, Callable, Iterable

#: one metric family: type, help and its samples ([name, labels, value])
Family = dict[str, Any]

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

    def families(self, **extra: str) -> dict[str, Family]:
        """Every metric as ``{name: {"type", "help", "samples": [[sample name, labels, value]]}}``
        (``extra`` labels added to each sample: the worker, when several share one /metrics)."""
        fams: dict[str, Family] = {}
        for name in sorted(self.counters):
            fams[name] = {"type": "counter", "help": self.help.get(name, name),
                          "samples": [[name, {**dict(labels), **extra}, value]
                                      for labels, value in sorted(self.counters[name].items())]}
        for name in sorted(self.gauges):
            try:
                value = float(self.gauges[name]())
            except Exception:
                continue
            fams[name] = {"type": "gauge", "help": self.help[name], "samples": [[name, dict(extra), value]]}
        h, running, samples = self.ack_latency, 0, []
        for bound, count in zip(h.buckets, h.counts):
            running += count
            samples.append(["kefu_ack_latency_seconds_bucket", {**extra, "le": str(bound)}, running])
        samples += [["kefu_ack_latency_seconds_bucket", {**extra, "le": "+Inf"}, h.count],
                    ["kefu_ack_latency_seconds_sum", dict(extra), round(h.sum, 6)],
                    ["kefu_ack_latency_seconds_count", dict(extra), h.count]]
        fams["kefu_ack_latency_seconds"] = {"type": "histogram", "samples": samples,
                                            "help": "From a client message's arrival to its ack (stored)."}
        return fams

    def render(self, *, worker: str | None = None, others: Iterable[dict[str, Family]] = ()) -> str:
        """The text exposition format (0.0.4).  With ``worker``, every sample is labelled with
        it and ``others`` (the other workers' :meth:`families`) are merged in, each family's
        samples together as the format requires."""
        merged = self.families(**({"worker": worker} if worker else {}))
        for fams in others:
            for name, fam in fams.items():
                into = merged.setdefault(name, {"type": fam["type"], "help": fam["help"], "samples": []})
                if into["type"] == fam["type"]:
                    into["samples"].extend(fam["samples"])
        out: list[str] = []
        for name in sorted(merged):
            fam = merged[name]
            out.append(f"# HELP {name} {fam['help']}")
            out.append(f"# TYPE {name} {fam['type']}")
            for sample, labels, value in fam["samples"]:
                out.append(f"{sample}{_labels(tuple(labels.items()))} {_num(float(value))}")
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
