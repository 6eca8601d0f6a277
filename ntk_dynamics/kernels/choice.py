"""Choosing an implementation: an analytic cost model of each method for the given shapes."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def choose(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2):
  """Cheapest available method by a pass-count model.

  Jacobian contraction costs min(P_leaf, O) passes per leaf plus the contraction
  (O1·O2·P multiply-adds); NTK-vector products cost O2 VJP+JVP pairs over the whole batch.
  """
  from ntk_dynamics.kernels.api import NtkImplementation
  n_params = sum(np.size(p) for p in jax.tree.leaves(params))
  o1 = sum(np.size(o) for o in jax.tree.leaves(fx1))
  o2 = sum(np.size(o) for o in jax.tree.leaves(fx2))
  jc_cost = o1 * o2 * n_params + (o1 + o2) * n_params
  vp_cost = o2 * 2 * n_params * (1 + o1 / max(o2, 1))
  if jc_cost <= vp_cost:
    return NtkImplementation.JACOBIAN_CONTRACTION
  return NtkImplementation.NTK_VECTOR_PRODUCTS
