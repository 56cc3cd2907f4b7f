"""hatmodel: the two-stream HAT training and evaluation pipeline on ``hatkernels.hier_align``.

- ``python -m hatmodel.train [--config NAME_OR_PATH] [key.sub=value ...]`` trains (with no
  arguments: a small HAT on the embedded generated scenes) and evaluates on the test split;
- ``python -m hatmodel.evaluate CHECKPOINT [--protocol 1k|5k]`` scores a checkpoint;
- :func:`hatmodel.evaluate.retrieval_metrics` gives R@K / rsum / ranks of a score matrix.

Modules: ``config`` (YAML + overrides), ``data`` (scenes, Karpathy splits, tokenizers,
loaders), ``models`` (factory; ``hat``), ``losses``, ``checkpoint``, ``train``, ``evaluate``.
"""

__all__ = ["config", "data", "models", "losses", "checkpoint", "train", "evaluate"]
