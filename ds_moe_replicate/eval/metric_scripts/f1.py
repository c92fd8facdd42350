"""Binary F1 of the positive class (label 1), as an ``evaluate`` metric script: the offline
fallback for ``evaluate.load("f1")``."""

import datasets
import evaluate

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall) of label 1."
_CITATION = ""
_KWARGS_DESCRIPTION = "predictions: list of int; references: list of int. Returns {'f1': float}."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}))

    def _compute(self, predictions, references, pos_label=1):
        tp = sum(int(p == pos_label and r == pos_label) for p, r in zip(predictions, references))
        fp = sum(int(p == pos_label and r != pos_label) for p, r in zip(predictions, references))
        fn = sum(int(p != pos_label and r == pos_label) for p, r in zip(predictions, references))
        return {"f1": float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0}
