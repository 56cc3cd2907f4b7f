"""Registers an alignment operator as a pair of ``torch.library`` custom ops.

``hatkernels::<name>`` (forward) and ``hatkernels::<name>_backward`` each get a fake
implementation for shapes, and autograd is registered on the forward op, so
``torch.compile(fullgraph=True)`` traces through ``hier_align`` without graph breaks. The
real implementations route to the chosen backend (see ``hatkernels.dispatch``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hatkernels.backends import get_backend
from hatkernels.backends.base import output_dtype


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


def register_alignment_op(name: str, extra_schema: str, method: str) -> Callable[..., Tensor]:
    """Define ``hatkernels::{name}`` and its backward; returns the forward op.

    ``extra_schema`` holds the op's own arguments between ``reduce`` and ``backend`` (e.g.
    ``"float lambda_softmax, "``); ``method`` names the backend methods ``{method}`` and
    ``{method}_backward`` that do the work.
    """
    common = "Tensor image_lengths, Tensor text_lengths, str direction, str reduce, "
    tail = "str backend, int memory_budget"
    lib = torch.library
    fwd_schema = f"(Tensor images, Tensor texts, {common}{extra_schema}{tail}) -> Tensor"
    bwd_schema = (
        f"(Tensor grad, Tensor images, Tensor texts, {common}{extra_schema}{tail}) "
        "-> (Tensor, Tensor)"
    )

    def forward_impl(images, texts, image_lengths, text_lengths, *args):
        check_lengths(image_lengths, images.shape[1], "image_lengths")
        check_lengths(text_lengths, texts.shape[1], "text_lengths")
        *op_args, backend, budget = args
        impl = getattr(get_backend(backend), method)
        return impl(images, texts, image_lengths, text_lengths, *op_args, budget)

    def forward_fake(images, texts, image_lengths, text_lengths, *args):
        return images.new_empty((images.shape[0], texts.shape[0]), dtype=output_dtype(images.dtype))

    def backward_impl(grad, images, texts, image_lengths, text_lengths, *args):
        *op_args, backend, budget = args
        impl = getattr(get_backend(backend), f"{method}_backward")
        return impl(grad, images, texts, image_lengths, text_lengths, *op_args, budget)

    def backward_fake(grad, images, texts, image_lengths, text_lengths, *args):
        return torch.empty_like(images), torch.empty_like(texts)

    lib.define(f"hatkernels::{name}", fwd_schema)
    lib.impl(f"hatkernels::{name}", "CompositeExplicitAutograd", forward_impl)
    lib.register_fake(f"hatkernels::{name}", forward_fake)
    lib.define(f"hatkernels::{name}_backward", bwd_schema)
    lib.impl(f"hatkernels::{name}_backward", "CompositeExplicitAutograd", backward_impl)
    lib.register_fake(f"hatkernels::{name}_backward", backward_fake)

    forward_op = getattr(torch.ops.hatkernels, name).default
    backward_op = getattr(torch.ops.hatkernels, f"{name}_backward").default

    def setup_context(ctx, inputs, output):
        images, texts, image_lengths, text_lengths, *rest = inputs
        ctx.save_for_backward(images, texts, image_lengths, text_lengths)
        ctx.rest = rest

    def backward(ctx, grad):
        images, texts, image_lengths, text_lengths = ctx.saved_tensors
        gi, gt = backward_op(
            grad.contiguous(), images, texts, image_lengths, text_lengths, *ctx.rest
        )
        return (gi, gt) + (None,) * (2 + len(ctx.rest))

    lib.register_autograd(f"hatkernels::{name}", backward, setup_context=setup_context)
    return forward_op
