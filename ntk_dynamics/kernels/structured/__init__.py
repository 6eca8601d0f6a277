"""NtkImplementation.STRUCTURED_DERIVATIVES for any JAX function (see "Structured derivatives" in README.md)."""
from ntk_dynamics.kernels.structured.core import ntk
from ntk_dynamics.kernels.structured.cost import estimate_flops

__all__ = ["ntk", "estimate_flops"]
