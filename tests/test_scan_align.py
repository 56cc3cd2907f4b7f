"""scan pooling (hatkernels::scan_align) on every CPU-runnable backend vs the float64 reference."""

import pytest
import torch

import alignment_tests as cases
from alignment_cases import SETTINGS, backend_params

POOLING = "scan"


@pytest.mark.parametrize("backend", backend_params())
def test_random_shapes(backend):
    cases.random_shapes(POOLING, backend)


@pytest.mark.parametrize("direction,reduce", SETTINGS)
@pytest.mark.parametrize("backend", backend_params())
def test_tiled_shapes(backend, direction, reduce):
    cases.tiled_shapes(POOLING, backend, direction, reduce)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", backend_params())
def test_low_precision(backend, dtype):
    cases.low_precision(POOLING, backend, dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_one_token_items(backend):
    cases.one_token_items(POOLING, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_padding_never_read(backend):
    cases.padding_never_read(POOLING, backend)
