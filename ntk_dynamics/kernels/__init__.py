"""The fast empirical NTK: API, implementations, and the choice between them."""
from ntk_dynamics.kernels.api import (EmpiricalKernel, NtkImplementation, empirical_kernel_fn,
                                      empirical_nngp_fn, empirical_ntk_fn, ntk_vp_fn)

__all__ = ["EmpiricalKernel", "NtkImplementation", "empirical_kernel_fn", "empirical_nngp_fn",
           "empirical_ntk_fn", "ntk_vp_fn"]
