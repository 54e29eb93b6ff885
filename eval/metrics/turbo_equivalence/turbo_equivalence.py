"""turbo_equivalence, loadable from the repository: ``evaluate.load("eval/metrics/turbo_equivalence")``.

The metric lives in the package (``hf_turbo/eval/metric/turbo_equivalence.py``, also reachable as
``hf_turbo.eval.METRIC_PATH`` after ``pip install``); this file re-exports it so the repository's
eval/ folder has the usual one-directory-per-metric layout. See that module for inputs and outputs.
"""

from hf_turbo.eval.metric.turbo_equivalence import TurboEquivalence

__all__ = ["TurboEquivalence"]
