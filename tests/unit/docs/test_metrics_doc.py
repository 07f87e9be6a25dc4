"""Every Prometheus metric the gateway and the LLM service define appears in docs/metrics.md."""

from __future__ import annotations

from pathlib import Path

from gateway.metrics import GatewayMetrics
from services.llm.metrics import LLMMetrics

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def _exposed_names(registry) -> list[str]:
    """Metric names as Prometheus scrapes them (counters with their _total suffix)."""
    return [f"{m.name}_total" if m.type == "counter" else m.name for m in registry.collect()]


def test_every_gateway_and_llm_metric_is_documented():
    text = DOC.read_text()
    names = _exposed_names(GatewayMetrics().registry) + _exposed_names(LLMMetrics().registry)
    assert len(names) >= 17
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"
