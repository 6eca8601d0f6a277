"""The fast empirical NTK: API, implementations, the choice between them, and blocked
multi-device evaluation."""
from ntk_dynamics.kernels.api import (EmpiricalKernel, NtkImplementation, empirical_kernel_fn,
                                      empirical_nngp_fn, empirical_ntk_fn, ntk_vp_fn)
from ntk_dynamics.kernels.blocks import BlockPlan, Blocked, batch
from ntk_dynamics.kernels.choice import autotuned_ntk_fn
from ntk_dynamics.kernels.precision import matmul_precision

__all__ = ["BlockPlan", "Blocked", "EmpiricalKernel", "NtkImplementation", "autotuned_ntk_fn",
           "batch", "empirical_kernel_fn", "empirical_nngp_fn", "empirical_ntk_fn",
           "matmul_precision", "ntk_vp_fn"]
