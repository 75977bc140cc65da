"""``/metrics`` in Prometheus' text format, with vLLM's metric names where one exists.

Histograms and request counters are observed by the server as requests end; scheduler state
(running, waiting, KV blocks, prefix cache, preemptions) and ollm's I/O counters (bytes to the
GPU and from disk, I/O waits, CPU-path time) are read at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
          1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class _StateCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, model: str, state: Callable[[], dict[str, float]]) -> None:
        self.model, self.state = model, state

    def collect(self) -> Iterator[Metric]:
        s = self.state()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", s["running"])
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to run.", s["waiting"])
        blocks = s["kv_blocks"]
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of the device KV blocks in use (0 to 1).",
            s["kv_used"] / blocks if blocks else 0.0,
        )
        yield gauge("ollm:kv_blocks_used", "Device KV blocks in use.", s["kv_used"])
        yield counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            s["prefix_queries"],
        )  # fmt: skip
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
            s["prefix_saved_tokens"],
        )  # fmt: skip
        yield counter("vllm:num_preemptions", "Sequences preempted.", s["preemptions"])
        yield counter(
            "ollm:host_to_device_bytes", "Bytes copied host -> GPU (weights, KV).", s["bytes_h2d"]
        )
        yield counter("ollm:disk_read_bytes", "Bytes read from disk.", s["bytes_disk"])
        yield counter(
            "ollm:io_wait_seconds",
            "Seconds compute waited for weights (host waits on the reader + GPU stalls on copies).",
            s["io_wait_seconds"],
        )
        yield counter(
            "ollm:cpu_path_seconds", "Seconds the CPU computed layers (hybrid decode).",
            s["cpu_seconds"],
        )  # fmt: skip


class ServeMetrics:
    """The registry of one server (not the global one: several servers may share a process)."""

    def __init__(self, model: str, state: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to the first token.", lab,
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between streamed pieces.", lab,
            buckets=_TOKEN, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Decode time per output token of a request.",
            lab, buckets=_TOKEN, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", lab,
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens of finished requests (once per request).",
            lab,
            registry=r,
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens of finished sequences.", lab, registry=r
        )
        self.success = Counter(
            "vllm:request_success", "Sequences ended, by finish reason (abort: cancelled).",
            [*lab, "finished_reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "ollm:requests_rejected", "Requests refused, by HTTP status.", [*lab, "status"],
            registry=r,
        )  # fmt: skip
        r.register(_StateCollector(model, state))

    def observe(
        self,
        arrival: float,
        first: float | None,
        end: float,
        gaps: list[float],
        prompt_tokens: int,
        tokens: int,
        reason: str,
    ) -> None:
        """Record one finished sequence (times from ``time.perf_counter``)."""
        m = self.model
        if first is not None:
            self.ttft.labels(m).observe(first - arrival)
            if tokens > 1:
                self.tpot.labels(m).observe((end - first) / (tokens - 1))
        for gap in gaps:
            self.itl.labels(m).observe(gap)
        self.e2e.labels(m).observe(end - arrival)
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(tokens)
        self.success.labels(m, reason).inc()

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
