"""The numbers that define the operators, in one place for the whole package.

The float64 reference, the torch backend and the Triton kernels import them from here; the
C++ and CUDA sources keep their own copies, each with a comment naming the constant here.
"""

from __future__ import annotations

# Scan pooling's guard against division by zero: in the norm across the other side
# (``a / (sqrt(sum a^2) + EPS)``) and in the cosine (``<x, c> / max(|x| |c|, EPS)``).
EPS = 1e-8
# Slope of the LeakyReLU that scan pooling applies to similarities before normalising them.
LEAKY_SLOPE = 0.1
# Largest inverse temperature ``lambda_softmax`` accepted. The kernels form
# ``lambda_softmax * b`` with ``|b| < 1`` and its gradient ``lambda_softmax * alpha * ...`` in
# float32; this bound keeps both far from float32's range (3.4e38) and is three orders of
# magnitude above the sharpest attention used in practice (HAT: 9).
MAX_LAMBDA_SOFTMAX = 1e4
