"""Label values chosen by callers are capped, so they cannot grow the time series."""

from __future__ import annotations

from hivewire.services.model import metrics as model_metrics
from hivewire.services.runtime.metrics import REGISTRY, BoundedLabel


def test_values_beyond_the_limit_share_one_label() -> None:
    label = BoundedLabel(limit=3)
    assert [label(v) for v in ("a", "b", "a", "c")] == ["a", "b", "a", "c"]
    assert [label(v) for v in ("d", "e", "b")] == ["_other", "_other", "b"]


def test_the_model_service_labels_at_most_64_model_names() -> None:
    # What the service does with each request's model name (any name with a catch-all).
    for i in range(500):
        model_metrics.PROMPT_TOKENS.labels(
            model=model_metrics.model_label(f"caller-chosen-{i}"), backend="deterministic"
        ).inc()
    names = {
        sample.labels["model"]
        for metric in REGISTRY.collect()
        if metric.name == "hivewire_model_prompt_tokens"
        for sample in metric.samples
        if sample.labels.get("model", "").startswith("caller-chosen-")
    }
    assert 0 < len(names) <= 64
    assert REGISTRY.get_sample_value(
        "hivewire_model_prompt_tokens_total", {"model": "_other", "backend": "deterministic"}
    )
