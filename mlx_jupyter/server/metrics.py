"""Prometheus metrics on Jupyter's /metrics: requests, tokens, TTFT and model life cycle."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.types import ModelStatus

REQUESTS = Counter("mlx_requests", "MLX API requests by endpoint and HTTP status", ["endpoint", "status"])
TOKENS = Counter("mlx_generated_tokens", "Tokens generated", ["model"])
TTFT = Histogram(
    "mlx_time_to_first_token_seconds",
    "Seconds from a generation request to its first token (model load included)",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# engine counter -> (metric name, help)
_LIFECYCLE = {
    "loads": ("mlx_model_loads", "Models loaded into a worker"),
    "load_failures": ("mlx_model_load_failures", "Model loads that failed"),
    "unloads": ("mlx_model_unloads", "Loaded models whose worker stopped, for any reason"),
    "idle_unloads": ("mlx_model_idle_unloads", "Models unloaded by the idle reaper"),
    "evictions": ("mlx_model_evictions", "Idle models evicted to make room for another"),
    "crashes": ("mlx_worker_crashes", "Worker processes that died unexpectedly"),
    "hung_kills": ("mlx_worker_hung_kills", "Worker processes killed for missing a token deadline"),
}


class EngineCollector(Collector):
    """Reads the manager's counters and the event hub's last snapshot at scrape time.

    Jupyter scrapes on its event loop, so this takes no engine lock: the counters are
    copied as they stand and model status comes from the snapshot the hub keeps.
    """

    def __init__(self, manager: WorkerManager, statuses: Callable[[], list[ModelStatus]]) -> None:
        self.manager = manager
        self.statuses = statuses

    @classmethod
    def register(cls, manager: WorkerManager, statuses: Callable[[], list[ModelStatus]]) -> EngineCollector:
        collector = cls(manager, statuses)
        REGISTRY.register(collector)
        return collector

    def unregister(self) -> None:
        REGISTRY.unregister(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = dict(self.manager.counters)
        for key, (name, help_text) in _LIFECYCLE.items():
            yield CounterMetricFamily(name, help_text, value=counts.get(key, 0))
        statuses = self.statuses()
        loaded = GaugeMetricFamily("mlx_loaded_models", "Resident models by state", labels=["state"])
        for state in ("starting", "ready", "draining", "stopping"):
            loaded.add_metric([state], sum(s.state == state for s in statuses))
        yield loaded
        memory = GaugeMetricFamily("mlx_model_memory_bytes", "Memory of each resident model", labels=["model"])
        for status in statuses:
            memory.add_metric([status.id], status.memory_bytes)
        yield memory
