"""Prometheus metrics of the daemon, on ``GET /metrics``.

Each app owns a :class:`prometheus_client.CollectorRegistry` (no process-global registry), so several
daemons in one process (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "MME_TIME_METRICS", "DaemonMetrics"]

#: CloudWatch's multi-model endpoint timings -> the Prometheus summaries (count, sum) that carry them.
MME_TIME_METRICS = {"ModelLoadingWaitTime": "sdmaker_mme_model_loading_wait_seconds",
                    "ModelDownloadingTime": "sdmaker_mme_model_downloading_seconds",
                    "ModelLoadingTime": "sdmaker_mme_model_loading_seconds",
                    "ModelUnloadingTime": "sdmaker_mme_model_unloading_seconds"}


class _ModelCacheCollector(Collector):
    """Multi-model endpoint metrics, read from each endpoint's ``ModelCacheStats`` at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.source() if self.source is not None else {}
        lookups = CounterMetricFamily("sdmaker_mme_model_cache_lookups",
                                      "ModelCacheHit: InvokeEndpoint requests of a multi-model endpoint whose target "
                                      "model was loaded (result=hit) or not (miss).", labels=["endpoint", "result"])
        loaded = GaugeMetricFamily("sdmaker_mme_loaded_model_count", "LoadedModelCount: target models loaded.",
                                   labels=["endpoint"])
        timings = {key: SummaryMetricFamily(name, f"{key}: seconds, per sample.", labels=["endpoint"])
                   for key, name in MME_TIME_METRICS.items()}
        for endpoint, st in stats.items():
            lookups.add_metric([endpoint, "hit"], st.hits)
            lookups.add_metric([endpoint, "miss"], st.misses)
            loaded.add_metric([endpoint], st.loaded)
            for key, family in timings.items():
                count, total = st.times[key]
                family.add_metric([endpoint], count_value=int(count), sum_value=total)
        yield lookups
        yield loaded
        yield from timings.values()

#: Latency buckets in seconds: tiny CPU models answer in ~0.1 s, full SD on CPU takes minutes.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class DaemonMetrics:
    """Counters and histograms of InvokeEndpoint, labelled by endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sdmaker_invocations", "InvokeEndpoint requests answered.",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("sdmaker_invocation_errors", "InvokeEndpoint errors by AWS error code.",
                              ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("sdmaker_invocation_latency_seconds", "InvokeEndpoint latency, queueing included.",
                                 ["endpoint"], buckets=_BUCKETS, registry=self.registry)
        self.images = Counter("sdmaker_images_generated", "Images returned by endpoints.", ["endpoint"],
                              registry=self.registry)
        self.queue_depth = Gauge("sdmaker_queue_depth", "Requests waiting for a free worker.", ["endpoint"],
                                 registry=self.registry)
        self.control = Counter("sdmaker_control_plane_calls", "SageMaker control-plane calls.",
                               ["operation", "status"], registry=self.registry)
        self.expected_wait = Gauge("sdmaker_expected_wait_seconds",
                                   "Seconds a request arriving now would wait for the work ahead of it "
                                   "(measured throughput; admission answers 503 past the timeout).",
                                   ["endpoint"], registry=self.registry)
        self._depths: Callable[[], dict[str, tuple[int, float]]] | None = None
        self.async_requests = Counter("sdmaker_async_invocations", "InvokeEndpointAsync submits answered.",
                                      ["endpoint", "status"], registry=self.registry)
        self.backlog_size = Gauge("sdmaker_async_approximate_backlog_size",
                                  "ApproximateBacklogSize: asynchronous requests queued or running.", ["endpoint"],
                                  registry=self.registry)
        self.backlog_age = Gauge("sdmaker_async_approximate_age_of_oldest_request_seconds",
                                 "ApproximateAgeOfOldestRequest: seconds the oldest queued asynchronous request "
                                 "has waited.", ["endpoint"], registry=self.registry)
        self._backlog: Callable[[], dict[str, tuple[int, float]]] | None = None
        self._model_cache = _ModelCacheCollector()
        self.registry.register(self._model_cache)

    def set_model_cache_source(self, source: Callable[[], dict[str, Any]]) -> None:
        """Read each multi-model endpoint's ``ModelCacheStats`` (by endpoint name) at scrape time."""
        self._model_cache.source = source

    def set_backlog_source(self, source: Callable[[], dict[str, tuple[int, float]]]) -> None:
        """Read (backlog size, age of the oldest request) per endpoint at scrape time (asynchronous inference)."""
        self._backlog = source

    def set_queue_depth_source(self, source: Callable[[], dict[str, tuple[int, float]]]) -> None:
        """Read (queue depth, expected wait) per endpoint at scrape time (they change too often to push)."""
        self._depths = source

    def render(self) -> bytes:
        if self._depths is not None:
            self.queue_depth.clear()
            self.expected_wait.clear()
            for name, (depth, wait) in self._depths().items():
                self.queue_depth.labels(endpoint=name).set(depth)
                self.expected_wait.labels(endpoint=name).set(wait)
        if self._backlog is not None:
            self.backlog_size.clear()
            self.backlog_age.clear()
            for name, (size, age) in self._backlog().items():
                self.backlog_size.labels(endpoint=name).set(size)
                self.backlog_age.labels(endpoint=name).set(age)
        return generate_latest(self.registry)
