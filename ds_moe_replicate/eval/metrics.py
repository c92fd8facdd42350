"""Metrics through ``evaluate``, falling back to the scripts shipped in ``eval/metric_scripts/``.

``evaluate.load("accuracy")`` fetches its script from the hub; offline (``HF_HUB_OFFLINE=1``, or
no network) it fails, and the same metric is loaded from the local script instead. Without
``evaluate`` installed at all, the metrics are computed directly.
"""

from __future__ import annotations

import os
from typing import Dict, Sequence

__all__ = ["compute_metrics"]

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_scripts")


def _direct(name: str, predictions: Sequence[int], references: Sequence[int]) -> Dict[str, float]:
    if name == "accuracy":
        n = len(references)
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / n if n else 0.0}
    tp = sum(int(p == 1 and r == 1) for p, r in zip(predictions, references))
    wrong = sum(int(p != r) for p, r in zip(predictions, references))
    return {"f1": 2 * tp / (2 * tp + wrong) if tp else 0.0}


def _load(name: str):
    import evaluate

    try:
        return evaluate.load(name), "hub"
    except Exception:  # noqa: BLE001 - any hub/network failure falls back to the shipped script
        return evaluate.load(os.path.join(_HERE, f"{name}.py")), "local"


def compute_metrics(names: Sequence[str], predictions: Sequence[int], references: Sequence[int]) -> Dict[str, float]:
    """{metric: value} for each of ``names`` (``"accuracy"``, ``"f1"``), plus ``"_source"``."""
    out: Dict[str, float] = {}
    sources = []
    for name in names:
        try:
            metric, source = _load(name)
            out.update({k: float(v) for k, v in metric.compute(predictions=list(predictions),
                                                                 references=list(references)).items()})
        except ImportError:
            source = "direct"
            out.update(_direct(name, predictions, references))
        sources.append(source)
    out["_source"] = ",".join(sorted(set(sources)))  # type: ignore[assignment]
    return out
