"""Accuracy, as an ``evaluate`` metric script: the offline fallback for ``evaluate.load("accuracy")``."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the references."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: list of int; references: list of int. Returns {'accuracy': float}."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}))

    def _compute(self, predictions, references):
        n = len(references)
        return {"accuracy": float(sum(int(p == r) for p, r in zip(predictions, references)) / n) if n else 0.0}
