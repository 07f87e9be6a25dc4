"""Prometheus metrics of the gateway, on a registry of their own (one per service instance).

Names follow vLLM's where one exists (time to first token, e2e request latency, prompt and
generation token counters), prefixed `modalmesh_gateway_`. Stage latencies (media fetch,
encode) and the feature-cache hit rate are what SERVING_NOTES section 6-7 ask to report.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class GatewayMetrics:
    """The gateway's metric families.

    Args:
        registry: Where to register; a fresh CollectorRegistry by default (never the global one,
            so that several apps can live in one process).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modalmesh_gateway_requests",
            "Requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "modalmesh_gateway_e2e_request_latency_seconds",
            "Chat request latency from arrival to the last token.",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "modalmesh_gateway_time_to_first_token_seconds",
            "Chat request latency from arrival to the first generated text.",
            ["transport"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "modalmesh_gateway_stage_latency_seconds",
            "Latency of one media stage per item: fetch, encode, decode_<modality> (generated media).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "modalmesh_gateway_prompt_tokens",
            "Prompt tokens (media placeholders included).",
            registry=r,
        )
        self.completion_tokens = Counter(
            "modalmesh_gateway_generation_tokens",
            "Generated tokens.",
            registry=r,
        )
        self.feature_cache = Counter(
            "modalmesh_gateway_feature_cache_lookups",
            "Feature cache lookups by result.",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):
            self.feature_cache.labels(result=result)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
