"""Evaluation: how much accuracy each precision keeps.

``evaluate(model_path, EvalOptions(tasks=...), DataDir(root))`` runs WikiText-2 perplexity (``ppl``), KL
divergence against a reference (``kl``), MMLU (``mmlu``) and GSM8K (``gsm8k``) on one ingot model and returns
(and writes) a results dict; ``compare(model_path, CompareOptions(...), DataDir(root))`` converts a model to
each scheme, evaluates each and writes report.md / report.png. The CLI: ``ingot eval`` and ``ingot compare``.
"""

from ingot.eval.compare import ALL_SCHEMES, CompareOptions, compare
from ingot.eval.data import DataDir, MissingDataError, seeded_subset
from ingot.eval.runner import TASKS, EvalOptions, IngotModel, default_reference, evaluate, format_summary

__all__ = [
    "ALL_SCHEMES",
    "CompareOptions",
    "DataDir",
    "EvalOptions",
    "IngotModel",
    "MissingDataError",
    "TASKS",
    "compare",
    "default_reference",
    "evaluate",
    "format_summary",
    "seeded_subset",
]
