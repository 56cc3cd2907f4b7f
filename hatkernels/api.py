"""``hier_align``: the public entry point. It validates once, normalises levels and lengths,
asks ``dispatch`` for a backend per level and sums the per-level custom-op results."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .constants import MAX_LAMBDA_SOFTMAX
from .dispatch import BACKEND_NAMES, select_backend
from .inputs import AlignInputs
from .ops import align

POOLINGS = ("max", "scan")
DIRECTIONS = ("t2i", "i2t", "both")
REDUCES = ("mean", "sum")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_MEMORY_BUDGET = 1 << 30

LengthsArg = Tensor | Sequence[Tensor | None] | None


def _as_levels(x: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        levels = [x]
    elif isinstance(x, Sequence) and not isinstance(x, str):
        levels = list(x)
        if not levels:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence of tensors")
    else:
        raise TypeError(
            f"{name}: expected a tensor or a sequence of tensors, got {type(x).__name__}"
        )
    for level, t in enumerate(levels):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{level}]: expected a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name}[{level}]: expected shape [batch, tokens, dim], got {tuple(t.shape)}"
            )
        if t.dtype not in DTYPES:
            raise TypeError(
                f"{name}[{level}]: dtype {t.dtype} not supported; expected float32, float16 "
                "or bfloat16 (float64 on the torch backend)"
            )
    return levels


def _as_lengths(x: LengthsArg, levels: list[Tensor], name: str) -> list[Tensor]:
    n_levels = len(levels)
    if x is None or isinstance(x, Tensor):
        per_level = [x] * n_levels
    elif isinstance(x, Sequence) and not isinstance(x, str):
        per_level = list(x)
        if any(not (e is None or isinstance(e, Tensor)) for e in per_level):
            raise TypeError(
                f"{name}: a sequence must hold one integer tensor (or None) per level; for "
                "per-item lengths pass one tensor, e.g. torch.tensor([...])"
            )
        if len(per_level) != n_levels:
            raise ValueError(
                f"{name}: expected {n_levels} entries (one per level), got {len(per_level)}"
            )
    else:
        raise TypeError(
            f"{name}: expected None, an integer tensor or a sequence of them, "
            f"got {type(x).__name__}"
        )
    out = []
    for level, (lengths, tokens) in enumerate(zip(per_level, levels)):
        batch, size = tokens.shape[0], tokens.shape[1]
        where = f"{name}[{level}]" if n_levels > 1 else name
        if lengths is None:
            out.append(torch.full((batch,), size, dtype=torch.int64, device=tokens.device))
            continue
        if not isinstance(lengths, Tensor):
            raise TypeError(
                f"{where}: expected an integer tensor or None, got {type(lengths).__name__}"
            )
        if (
            lengths.dtype.is_floating_point
            or lengths.dtype.is_complex
            or lengths.dtype == torch.bool
        ):
            raise TypeError(f"{where}: expected an integer tensor, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"{where}: expected shape ({batch},), got {tuple(lengths.shape)}")
        if lengths.device.type == "meta" and tokens.device.type != "meta":
            raise ValueError(
                f"{where}: lengths on the meta device hold no values; pass them on "
                f"{tokens.device} (the tokens' device) or on the CPU"
            )
        # Lengths on another device than the tokens (e.g. CPU lengths for GPU tokens) are
        # copied over: they are small and read by value.
        out.append(lengths.to(device=tokens.device, dtype=torch.int64).contiguous())
    return out


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_weights(weights: Sequence[float] | None, n_levels: int) -> list[float]:
    if weights is None:
        return [1.0] * n_levels
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, Tensor)):
        raise TypeError(
            f"weights: expected a sequence of {n_levels} numbers, got {type(weights).__name__}"
        )
    values = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != n_levels:
        raise ValueError(f"weights: expected {n_levels} numbers (one per level), got {len(values)}")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"weights: every weight must be finite, got {values}")
    return values


def hier_align(
    images: Tensor | Sequence[Tensor],
    texts: Tensor | Sequence[Tensor],
    *,
    image_lengths: LengthsArg = None,
    text_lengths: LengthsArg = None,
    pooling: str = "max",
    direction: str = "t2i",
    reduce: str = "mean",
    lambda_softmax: float = 9.0,
    weights: Sequence[float] | None = None,
    backend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Score every (image, caption) pair from token-to-token alignment (the exact math is in
    ``docs/operators.md``).

    Args:
        images: ``[Bi, M, D]`` image tokens, or a sequence of ``L`` such tensors (one per
            level; ``M`` and ``D`` may differ between levels, ``Bi`` may not).
        texts: ``[Bt, N, D]`` caption tokens, or a sequence of ``L`` (same ``D`` as the
            images of the level).
        image_lengths, text_lengths: valid tokens per item (the first ones; the rest is
            padding and may hold anything). ``None`` (all valid), one integer tensor ``[B]``
            for every level, or a sequence of ``L`` entries (each ``None`` or a tensor).
            Values must lie in ``[1, M]`` / ``[1, N]``. Lengths on another device than the
            tokens are copied to it (not from the meta device, which holds no values).
        pooling: ``"max"`` (TERAN/ColBERT) or ``"scan"`` (HAT's cross-attention).
        direction: ``"t2i"`` (words query image tokens), ``"i2t"`` or ``"both"`` (their sum).
        reduce: ``"mean"`` or ``"sum"`` over the query side's valid tokens.
        lambda_softmax: inverse temperature of scan pooling (HAT: 9), in ``(0, 1e4]``.
        weights: ``L`` level weights (default all 1).
        backend: ``"auto"`` (fastest available for the device), ``"torch"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``. ``HATKERNELS_BACKEND`` overrides ``"auto"``.
        memory_budget: bytes of working memory for backends that size blocks to a budget
            (the torch backend), and what the cpu backend may keep between max pooling's
            forward and backward (every query token's winner, 4 bytes per query token and
            pair; with less, its backward recomputes the similarities); the ``[Bi, Bt]``
            output is extra.

    Returns:
        ``[Bi, Bt]`` float32 scores (float64 for float64 inputs), differentiable; an empty
        batch gives an empty matrix, still connected to the graph. A NaN or Inf in a valid
        token makes the scores of the pairs of its item NaN and nothing else (the gradients
        likewise, where the upstream gradient is nonzero).

    Equivalent PyTorch for one level of max/t2i/mean with no padding::

        s = torch.einsum("imd,jnd->ijmn", images, texts)
        scores = s.amax(2).mean(2)
    """
    image_levels = _as_levels(images, "images")
    text_levels = _as_levels(texts, "texts")
    n_levels = len(image_levels)
    if len(text_levels) != n_levels:
        raise ValueError(
            f"texts: expected {n_levels} levels to match images, got {len(text_levels)}"
        )
    _check_choice(pooling, "pooling", POOLINGS)
    _check_choice(direction, "direction", DIRECTIONS)
    _check_choice(reduce, "reduce", REDUCES)
    _check_choice(backend, "backend", BACKEND_NAMES)
    if isinstance(lambda_softmax, bool) or not isinstance(lambda_softmax, (int, float)):
        raise TypeError(f"lambda_softmax: expected a number, got {type(lambda_softmax).__name__}")
    if not (0 < lambda_softmax <= MAX_LAMBDA_SOFTMAX):
        raise ValueError(
            f"lambda_softmax: expected a number in (0, {MAX_LAMBDA_SOFTMAX:g}] (larger values "
            f"overflow the kernels' float32 arithmetic), got {lambda_softmax}"
        )
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
        raise TypeError(
            f"memory_budget: expected an int (bytes), got {type(memory_budget).__name__}"
        )
    if memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget}")
    level_weights = _check_weights(weights, n_levels)

    first = image_levels[0]
    n_images, n_texts = first.shape[0], text_levels[0].shape[0]
    for level, (v, t) in enumerate(zip(image_levels, text_levels)):
        if v.shape[0] != n_images:
            raise ValueError(
                f"images[{level}]: batch {v.shape[0]} differs from level 0's {n_images}"
            )
        if t.shape[0] != n_texts:
            raise ValueError(f"texts[{level}]: batch {t.shape[0]} differs from level 0's {n_texts}")
        if v.shape[2] != t.shape[2]:
            raise ValueError(
                f"texts[{level}]: feature size {t.shape[2]} differs from "
                f"images[{level}]'s {v.shape[2]}"
            )
        if v.dtype != first.dtype or t.dtype != first.dtype:
            raise TypeError(
                f"images/texts[{level}]: all levels must share one dtype ({first.dtype}), "
                f"got {v.dtype} and {t.dtype}"
            )
        if v.device != first.device or t.device != first.device:
            raise ValueError(
                f"images/texts[{level}]: all tensors must be on one device ({first.device}), "
                f"got {v.device} and {t.device}"
            )
        # An empty batch is checked like any other: each non-empty side needs tokens.
        if (n_images and v.shape[1] == 0) or (n_texts and t.shape[1] == 0) or v.shape[2] == 0:
            raise ValueError(
                f"images/texts[{level}]: need at least one token and one feature, got "
                f"{tuple(v.shape)} and {tuple(t.shape)}"
            )

    image_len = _as_lengths(image_lengths, image_levels, "image_lengths")
    text_len = _as_lengths(text_lengths, text_levels, "text_lengths")
    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in image_levels + text_levels
    )
    total = None
    for w, v, t, vl, tl in zip(level_weights, image_levels, text_levels, image_len, text_len):
        inp = AlignInputs(v.contiguous(), t.contiguous(), vl, tl, pooling, direction, reduce,
                          float(lambda_softmax), memory_budget, needs_grad)  # fmt: skip
        s = align(inp, select_backend(inp, backend).name)
        s = s if w == 1.0 else s * w
        total = s if total is None else total + s
    return total
