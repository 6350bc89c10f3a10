"""Layer 6: sample-quality metrics, FID/KID, the offline classifier, the quality-vs-steps benchmark (measurement in
``bench``, tables and plots in ``report``)."""

from . import metrics
from .bench import EvalSettings, PartialResults, image_scorer, quality_vs_steps, scorer_for, vector_scorer
from .report import machine_info, markdown_table, write_results

__all__ = ["EvalSettings", "PartialResults", "image_scorer", "machine_info", "markdown_table", "metrics",
           "quality_vs_steps", "scorer_for", "vector_scorer", "write_results"]
