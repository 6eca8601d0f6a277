"""ntk_dynamics: fast finite-width neural tangent kernels and what they predict.

Subpackages: `kernels` (the empirical NTK), `dynamics` (closed-form training dynamics and
predicted training curves), `init` (NTK-based initialization tweaks), `meta` (few-shot
meta-learning with closed-form inner loops). The names most users need are re-exported here.
"""
from ntk_dynamics import dynamics, init, kernels, meta, models
from ntk_dynamics.dynamics import (UntrustedPredictionWarning, compare_curves, gradient_descent,
                                   gradient_descent_mse, gradient_descent_mse_steps,
                                   largest_eigenvalue, max_learning_rate, momentum_flow_mse,
                                   predict_curves, train_curves)
from ntk_dynamics.haiku import from_haiku
from ntk_dynamics.init import (balance_layers, center_outputs, layer_shares, ntk_spectrum,
                               search_init_scales, spectral_learning_rate)
from ntk_dynamics.kernels import (BlockPlan, Blocked, EmpiricalKernel, NtkImplementation,
                                  autotuned_ntk_fn, batch, empirical_kernel_fn,
                                  empirical_nngp_fn, empirical_ntk_fn, matmul_precision,
                                  ntk_vp_fn)
from ntk_dynamics.linearize import linearize, taylor_expand
from ntk_dynamics.meta import make_inner_loop, meta_train

__version__ = "0.1.0"

__all__ = [
    "BlockPlan", "Blocked", "EmpiricalKernel", "NtkImplementation",
    "UntrustedPredictionWarning", "autotuned_ntk_fn", "balance_layers", "batch",
    "center_outputs", "compare_curves", "dynamics", "empirical_kernel_fn", "empirical_nngp_fn",
    "empirical_ntk_fn", "from_haiku", "gradient_descent", "gradient_descent_mse",
    "gradient_descent_mse_steps", "init", "kernels", "largest_eigenvalue", "layer_shares",
    "linearize", "make_inner_loop", "matmul_precision", "max_learning_rate", "meta", "models",
    "momentum_flow_mse", "ntk_spectrum", "ntk_vp_fn", "predict_curves", "search_init_scales",
    "spectral_learning_rate", "taylor_expand", "train_curves",
]
