"""Prometheus metrics of the LLM service, on a registry of their own (one per engine).

Names follow vLLM's where one exists (`time_to_first_token_seconds`,
`inter_token_latency_seconds`, `e2e_request_latency_seconds`, `request_queue_time_seconds`,
`request_prefill_time_seconds`, prompt and generation token counters), prefixed
`modalmesh_llm_`. `batch_size` is the number of requests each decode step advances (the rows
of one continuous batch); `requests_held` is what the queue bound counts.
`python -m services.llm` serves them at http://<host>:<llm_metrics_port>/metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LLMMetrics:
    """The LLM service's metric families.

    Args:
        registry: Where to register; a fresh CollectorRegistry by default (never the global one,
            so that several engines can live in one process, as in the tests).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_time = Histogram(
            "modalmesh_llm_request_queue_time_seconds",
            "From admission to the start of the request's prefill.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "modalmesh_llm_request_prefill_time_seconds",
            "Connector, embedding and the prompt's forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "modalmesh_llm_time_to_first_token_seconds",
            "From admission to the first sampled token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "modalmesh_llm_inter_token_latency_seconds",
            "Between two sampled tokens of one request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "modalmesh_llm_e2e_request_latency_seconds",
            "From admission to the last event of the request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "modalmesh_llm_batch_size",
            "Requests advanced by one decode step.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.held = Gauge(
            "modalmesh_llm_requests_held", "Requests admitted and not ended (queued or running).", registry=r
        )
        self.requests = Counter(
            "modalmesh_llm_requests", "Requests by how they ended.", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "modalmesh_llm_prompt_tokens", "Prompt tokens (media included).", registry=r
        )
        self.generation_tokens = Counter("modalmesh_llm_generation_tokens", "Sampled tokens.", registry=r)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port from a daemon thread (prometheus_client's server)."""
        start_http_server(port, addr=host, registry=self.registry)
