"""Counters, gauges and histograms rendered in Prometheus' text exposition format.

Thread-safe (the engine thread and the HTTP handlers both record). No dependency: the format is
a few lines of text per metric (``# HELP``, ``# TYPE``, then ``name{labels} value``).
"""

from __future__ import annotations

import bisect
import threading

#: Bucket bounds (seconds) for latency histograms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Bucket bounds for the batch-size histogram.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metric:
    """Base: a name, a help line, a type and a lock."""

    kind = "untyped"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self._lock = threading.Lock()

    def lines(self) -> list[str]:
        """The metric's sample lines."""
        raise NotImplementedError

    def render(self) -> str:
        """HELP, TYPE and samples."""
        head = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join(head + self.lines())


class Counter(Metric):
    """A value that only goes up, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to the series named by ``labels``."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current value of one series."""
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or [((), 0.0)]
            return [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in items]


class Gauge(Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self._value = 0.0

    def set(self, value: float) -> None:
        """Set the current value."""
        self._value = float(value)

    def lines(self) -> list[str]:
        return [f"{self.name} {self._value:g}"]


class Histogram(Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        """Number of observations so far."""
        return sum(self._counts)

    def lines(self) -> list[str]:
        with self._lock:
            out, running = [], 0
            for bound, count in zip(self.buckets, self._counts):
                running += count
                out.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
            total = running + self._counts[-1]
            out.append(f'{self.name}_bucket{{le="+Inf"}} {total}')
            out += [f"{self.name}_sum {self._sum:g}", f"{self.name}_count {total}"]
            return out


class ServerMetrics:
    """Every metric ``loraq serve`` exposes at ``GET /metrics``."""

    def __init__(self) -> None:
        self.requests = Counter(
            "loraq_requests_total",
            "Requests by outcome: ok, error, cancelled, rejected (4xx before generating).",
        )
        self.prompt_tokens = Counter("loraq_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generated_tokens = Counter("loraq_generated_tokens_total", "Tokens generated.")
        self.prefix_hits = Counter(
            "loraq_prefix_cache_hits_total",
            "Prompts prefilled from a recent prompt's keys and values (a common prefix).",
        )
        self.prefix_reused_tokens = Counter(
            "loraq_prefix_cache_reused_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache, not a prefill.",
        )
        self.queue_depth = Gauge("loraq_queue_depth", "Requests waiting to join the batch.")
        self.running = Gauge("loraq_running_sequences", "Sequences in the running batch.")
        self.adapters = Gauge("loraq_resident_adapters", "Adapters loaded in memory.")
        self.adapter_loads = Counter(
            "loraq_adapter_loads_total",
            "Adapters loaded into the model (first use, or reloaded after an LRU eviction).",
        )
        self.adapter_evictions = Counter(
            "loraq_adapter_evictions_total",
            "Resident adapters evicted by the LRU to make room for another.",
        )
        self.batch_size = Histogram(
            "loraq_batch_size", "Rows per forward step (prefill or decode).", BATCH_BUCKETS
        )
        self.ttft = Histogram(
            "loraq_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            LATENCY_BUCKETS,
        )
        self.inter_token = Histogram(
            "loraq_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
            LATENCY_BUCKETS,
        )

    def render(self) -> str:
        """All metrics in Prometheus' text format."""
        parts = [m.render() for m in vars(self).values() if isinstance(m, Metric)]
        return "\n".join(parts) + "\n"
