"""Host-side pieces several optimizers' scalars share, computed one way.

(Element-side pieces stay in each element: a shared function called from an element
would need one compiled form per target; numba's register_jitable gives that, but its
CUDA form asks the current device for its compute capability at compile time, so
elements could no longer be compiled to PTX on a machine without a GPU.)
"""
from __future__ import annotations


def lerp_fields(beta1, cast) -> dict:
    """The scalars of torch's ``lerp(m, g, 1 - beta1)`` in an element: the weight
    ``1 - beta1``, ``1 - weight`` in the math precision (the factor of torch's second
    form, ``g - (g - m) * (1 - weight)``, taken when the weight is >= 0.5) and which
    form torch takes."""
    weight = cast(1.0 - beta1)
    return dict(one_minus_beta1=weight, lerp_back=cast(cast(1.0) - weight),
                lerp_from_end=bool(1.0 - beta1 >= 0.5))
