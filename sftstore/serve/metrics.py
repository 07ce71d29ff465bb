"""The server's Prometheus metrics, in a registry of its own (`prometheus-client`: the reference client, which
keeps the text format, label escaping and histogram buckets right and is safe to update from the worker thread)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Requests by pair and status, swaps by kind, batch sizes, latencies, and the delta cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sft_requests", "Prediction requests by resolved pair and HTTP status",
                                ["task", "lang", "status"], registry=r)
        self.request_seconds = Histogram("sft_request_seconds", "Prediction request latency, received to answered",
                                         buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("sft_queue_wait_seconds", "Time a request waited for the model worker",
                                    buckets=_SECONDS, registry=r)
        self.swap_seconds = Histogram("sft_swap_seconds", "Time to make another pair resident", buckets=_SECONDS,
                                      registry=r)
        self.forward_seconds = Histogram("sft_forward_seconds", "Model time of one batch of requests",
                                         buckets=_SECONDS, registry=r)
        self.batch_inputs = Histogram("sft_batch_inputs", "Inputs per forward pass",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.swaps = Counter("sft_swaps", "Deltas changed on the resident model, by kind", ["kind"], registry=r)
        self.cache_bytes = Gauge("sft_delta_cache_bytes", "Bytes of deltas cached on the device", registry=r)
        self.cache_entries = Gauge("sft_delta_cache_entries", "Deltas cached on the device", registry=r)
        self.cache_events = Counter("sft_delta_cache", "Delta cache lookups and evictions", ["event"], registry=r)
        self.queued_inputs = Gauge("sft_queued_inputs", "Inputs waiting for the model worker", registry=r)

    def watch(self, cache, queued_inputs: Callable[[], int]) -> None:
        """Read the cache's size and the queue's depth at every scrape."""
        self.cache_bytes.set_function(lambda: cache.bytes)
        self.cache_entries.set_function(lambda: len(cache))
        self.queued_inputs.set_function(queued_inputs)

    def cache_event(self, event: str) -> None:
        self.cache_events.labels(event=event).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
