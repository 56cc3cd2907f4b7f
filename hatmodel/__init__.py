"""hatmodel: the two-stream HAT and TERAN training, evaluation and search pipeline on
``hatkernels``.

Commands (each ``python -m hatmodel.<name> --help``):

- ``train``: trains a config (with no arguments: a small HAT on the embedded generated scenes)
  and evaluates it on the test split; under ``torchrun`` over several processes;
- ``evaluate``: R@K / rsum / ranks of a checkpoint (``--protocol 1k|5k``), optionally through
  token stores or sharded over ``torchrun`` ranks;
- ``visualize``: the word-to-region / word-to-patch alignment picture of a pair;
- ``index`` / ``search``: encode a split into a token store, then exact top-k search;
- ``serve``: a search page and JSON API over an index.

Modules: ``config`` (YAML, overrides, validation), ``data`` (scenes, Karpathy splits, region
features, tokenizers, loaders), ``models`` (factory; ``hat``, ``teran``), ``losses``,
``runtime`` (device, seeding, autocast, schedules), ``checkpoint`` (atomic, pickle-free),
``distributed`` (torchrun), ``cli`` (how commands report bad input), and one module per command.
"""

__all__ = ["config", "data", "models", "losses", "runtime", "checkpoint", "distributed",
           "train", "evaluate", "visualize", "index", "search", "serve"]
