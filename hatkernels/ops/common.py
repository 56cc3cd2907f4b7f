"""What both alignment ops do around a backend's kernels: length checks, empty batches and
the rule for non-finite tokens, forward and backward, the same for every backend; and their
registration (fake implementations for shapes, autograd through the backward op), so that
``torch.compile(fullgraph=True)`` traces through ``hier_align`` without graph breaks.

Both ops are declared by ``define_align_ops`` from one typed parameter list (the arguments
every op shares, the pooling's own settings between ``reduce`` and ``backend``), from which
``torch.library.custom_op`` infers the forward's schema; the backward op takes ``grad`` and
``saved`` first, then the same arguments. The forward returns ``(scores, saved)``: ``saved``
is an int32 tensor that the backend chose to keep for its backward (``Backend.align``; the
cpu backend's max pooling winners when ``needs_grad``), empty for every other call; autograd
keeps it and hands it to the backward op.

Non-finite tokens: a NaN or Inf in a valid token makes exactly the scores of the pairs that
contain its item NaN, and, in the backward, the gradients of the valid tokens of both items of
each such pair that has a nonzero upstream gradient; every other score and gradient is
bit-identical to a run where that token holds a finite value. The kernels never see the
non-finite values: such tokens are replaced by zeros before a kernel runs (so no kernel can
leak them into other pairs through a shared tile), and the affected rows and columns are set
to NaN afterwards. Padding is never part of this: it is never read.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import Tensor
from torch.library import CustomOpDef

from hatkernels.backends import get_backend
from hatkernels.backends.base import output_dtype
from hatkernels.inputs import AlignInputs


def check_lengths(lengths: Tensor, size: int, name: str) -> None:
    """Values in [1, size]: runs inside the op, where tensors are real (also when compiled)."""
    if lengths.numel() == 0:
        return
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > size:
        raise ValueError(
            f"{name}: every length must be in [1, {size}] (the token dimension), "
            f"got values from {low} to {high}"
        )


def _valid(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def _nonfinite_items(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor] | None:
    """The valid tokens holding a NaN or an Inf (``[B, L]``) and the items holding one
    (``[B]``), or None when there is none (the common case: one pass over ``x``, one sync).

    A row sum over ``D`` (float32, or float64 for float64 inputs) is non-finite when the row
    is; rows whose sum overflowed from finite values are told apart by an exact check of
    those rows only."""
    suspect = ~torch.isfinite(x.sum(-1, dtype=output_dtype(x.dtype))) & _valid(
        lengths, x.shape[1]
    )
    if not bool(suspect.any()):
        return None
    tokens = suspect.clone()
    tokens[suspect] = ~torch.isfinite(x[suspect]).all(-1)
    items = tokens.any(1)
    return (tokens, items) if bool(items.any()) else None


def _finite(inp: AlignInputs) -> tuple[AlignInputs, Tensor | None, Tensor | None]:
    """``inp`` with non-finite valid tokens replaced by zeros, and which images and captions
    held one (``[Bi]``, ``[Bt]``; both None when every valid token is finite)."""
    bad_v = _nonfinite_items(inp.images, inp.image_lengths)
    bad_t = _nonfinite_items(inp.texts, inp.text_lengths)
    if bad_v is None and bad_t is None:
        return inp, None, None
    zero = torch.zeros((), dtype=inp.dtype, device=inp.device)
    sides = []
    for x, bad in ((inp.images, bad_v), (inp.texts, bad_t)):
        if bad is None:
            sides.append((x, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)))
        else:
            sides.append((torch.where(bad[0][..., None], zero, x), bad[1]))
    (images, items_v), (texts, items_t) = sides
    return replace(inp, images=images, texts=texts), items_v, items_t


def forward(inp: AlignInputs, backend: str) -> tuple[Tensor, Tensor]:
    """``[Bi, Bt]`` scores of one level from ``backend``, lengths checked, NaN rule applied,
    and what the backend keeps for the backward (computed from the same zeroed tokens that
    the backward's kernels see)."""
    check_lengths(inp.image_lengths, inp.image_tokens, "image_lengths")
    check_lengths(inp.text_lengths, inp.text_tokens, "text_lengths")
    if inp.empty:
        nothing = torch.empty(0, dtype=torch.int32, device=inp.device)
        return fake_scores(inp.images, inp.texts).zero_(), nothing
    clean, bad_v, bad_t = _finite(inp)
    out, saved = get_backend(backend).align(clean)
    if bad_v is None:
        return out, saved
    return out.masked_fill(bad_v[:, None] | bad_t[None, :], float("nan")), saved


def backward(
    grad: Tensor, saved: Tensor, inp: AlignInputs, backend: str
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * scores)`` w.r.t. images and texts, NaN rule applied
    (``saved``: what the forward kept)."""
    if inp.empty:
        return torch.zeros_like(inp.images), torch.zeros_like(inp.texts)
    clean, bad_v, bad_t = _finite(inp)
    gi, gt = get_backend(backend).align_backward(grad, clean, saved)
    if bad_v is None:
        return gi, gt
    hit = (bad_v[:, None] | bad_t[None, :]) & (grad != 0)
    return _nan_rows(gi, inp.image_lengths, hit.any(1)), _nan_rows(gt, inp.text_lengths, hit.any(0))


def _nan_rows(g: Tensor, lengths: Tensor, items: Tensor) -> Tensor:
    """``g`` with the valid token rows of ``items`` (``[B]`` bool) set to NaN."""
    rows = items[:, None] & _valid(lengths, g.shape[1])
    return g.masked_fill(rows[..., None], float("nan"))


def fake_scores(images: Tensor, texts: Tensor, *settings) -> Tensor:
    """The forward's scores for shapes only (also the empty result of an empty batch)."""
    return images.new_empty((images.shape[0], texts.shape[0]), dtype=output_dtype(images.dtype))


def fake_outputs(images: Tensor, texts: Tensor, *settings) -> tuple[Tensor, Tensor]:
    """The forward's outputs for shapes only: the scores, and ``saved``, whose size only the
    backend knows once it has seen the lengths (a data-dependent size under torch.compile)."""
    size = torch.library.get_ctx().new_dynamic_size()
    return fake_scores(images, texts), images.new_empty((size,), dtype=torch.int32)


def fake_grads(
    grad: Tensor, saved: Tensor, images: Tensor, texts: Tensor, *settings
) -> tuple[Tensor, Tensor]:
    """The backward's outputs for shapes only."""
    return torch.empty_like(images), torch.empty_like(texts)


def register_autograd(op: CustomOpDef, backward_op: CustomOpDef) -> None:
    """Autograd of ``op`` (arguments: images, texts, image_lengths, text_lengths, then its
    settings; outputs: scores and ``saved``) through ``backward_op`` (``grad`` and ``saved``
    first, then the same arguments)."""

    def setup_context(ctx, inputs, output):
        images, texts, image_lengths, text_lengths, *settings = inputs
        ctx.save_for_backward(output[1], images, texts, image_lengths, text_lengths)
        ctx.settings = settings
        # No zero-filled stand-in for ``saved``'s gradient (it has none; the copy would cost
        # as much as ``saved``), so an undefined gradient arrives as None.
        ctx.set_materialize_grads(False)

    def backward_fn(ctx, grad, grad_saved):
        nothing = (None,) * (2 + len(ctx.settings))
        if grad is None:
            return (None, None) + nothing
        gi, gt = backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.settings)
        return (gi, gt) + nothing

    op.register_fake(fake_outputs)
    backward_op.register_fake(fake_grads)
    op.register_autograd(backward_fn, setup_context=setup_context)


_ARGUMENT = inspect.Parameter.POSITIONAL_OR_KEYWORD
# The typed arguments of every alignment op, in order; a pooling's own settings go in between.
_LEADING = {"images": Tensor, "texts": Tensor, "image_lengths": Tensor, "text_lengths": Tensor,
            "direction": str, "reduce": str}  # fmt: skip
_TRAILING = {"backend": str, "memory_budget": int, "needs_grad": bool}


def define_align_ops(pooling: str, **settings: type) -> tuple[CustomOpDef, CustomOpDef]:
    """The custom ops ``hatkernels::{pooling}_align`` and ``..._align_backward``, registered.

    The forward's typed parameters are ``images, texts, image_lengths, text_lengths,
    direction, reduce``, then ``settings`` (the pooling's own, by name and type, each an
    ``AlignInputs`` field; one a pooling lacks takes 0.0), then ``backend, memory_budget,
    needs_grad`` (default False: whether the backward will run, so the backend may keep
    something for it); ``torch.library.custom_op`` infers the schema from them. The forward
    returns ``(scores, saved)``; the backward takes ``grad: Tensor, saved: Tensor`` first,
    then the same arguments, and returns both gradients. Declaring the argument list once
    keeps the two ops of a pooling, and the two poolings, in step."""
    types = {**_LEADING, **settings, **_TRAILING}
    params = [
        inspect.Parameter(name, _ARGUMENT, annotation=t, default=False)
        if name == "needs_grad"
        else inspect.Parameter(name, _ARGUMENT, annotation=t)
        for name, t in types.items()
    ]
    signature = inspect.Signature(params)

    def inputs(args: tuple) -> tuple[AlignInputs, str]:
        bound = signature.bind(*args)
        bound.apply_defaults()
        a = bound.arguments
        inp = AlignInputs(a["images"], a["texts"], a["image_lengths"], a["text_lengths"],
                          pooling, a["direction"], a["reduce"], a.get("lambda_softmax", 0.0),
                          a["memory_budget"], a["needs_grad"])  # fmt: skip
        return inp, a["backend"]

    def forward_op(*args):
        return forward(*inputs(args))

    def backward_op(grad, saved, *args):
        return backward(grad, saved, *inputs(args))

    forward_op.__signature__ = signature.replace(return_annotation=tuple[Tensor, Tensor])
    grad, saved = (inspect.Parameter(name, _ARGUMENT, annotation=Tensor)
                   for name in ("grad", "saved"))  # fmt: skip
    backward_op.__signature__ = inspect.Signature(
        [grad, saved, *params], return_annotation=tuple[Tensor, Tensor]
    )
    op = torch.library.custom_op(f"hatkernels::{pooling}_align", forward_op, mutates_args=())
    grad_op = torch.library.custom_op(
        f"hatkernels::{pooling}_align_backward", backward_op, mutates_args=()
    )
    register_autograd(op, grad_op)
    return op, grad_op
