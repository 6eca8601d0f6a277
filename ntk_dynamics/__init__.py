"""ntk_dynamics: fast finite-width neural tangent kernels and what they predict."""
from ntk_dynamics.haiku import from_haiku
from ntk_dynamics.kernels import (EmpiricalKernel, NtkImplementation, empirical_kernel_fn,
                                  empirical_nngp_fn, empirical_ntk_fn, ntk_vp_fn)
from ntk_dynamics.linearize import linearize, taylor_expand

__version__ = "0.1.0"

__all__ = ["EmpiricalKernel", "NtkImplementation", "empirical_kernel_fn", "empirical_nngp_fn",
           "empirical_ntk_fn", "from_haiku", "linearize", "ntk_vp_fn", "taylor_expand"]
