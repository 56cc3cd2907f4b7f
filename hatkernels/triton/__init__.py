"""Triton kernels of the ``triton`` backend, one module per operator."""
