"""Linearization and Taylor expansion of `f(params, x)` in its parameters.

Both return functions with the signature of `f` itself, so they drop into any code that trains
or evaluates `f` (optax loops, the empirical NTK, the closed-form dynamics).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntk_dynamics._checks import check_params_match

PyTree = Any
ApplyFn = Callable[..., PyTree]


def _param_delta(params: PyTree, params_0: PyTree) -> PyTree:
  check_params_match("params", params, params_0)
  return jax.tree.map(lambda p, p0: jnp.asarray(p, dtype=jnp.result_type(p0)) - p0,
                      params, params_0)


def linearize(f: ApplyFn, params: PyTree) -> ApplyFn:
  """First-order Taylor expansion of `f` around `params`.

  Args:
    f: `f(params, x, **kwargs) -> outputs` (any pytrees), differentiable in `params`.
    params: the expansion point θ₀ (a pytree like `f`'s first argument).

  Returns:
    `f_lin(p, x, **kwargs) = f(θ₀, x) + J(θ₀, x)·(p − θ₀)`, computed with one forward-mode
    JVP (cost about two forward passes, no Jacobian formed). Outputs have the shapes of
    `f(θ₀, x)`. Jittable and differentiable in `p` (its NTK equals `f`'s NTK at θ₀).
  """

  def f_lin(p: PyTree, x: PyTree, **kwargs) -> PyTree:
    delta = _param_delta(p, params)
    f0, df = jax.jvp(lambda q: f(q, x, **kwargs), (params,), (delta,))
    return jax.tree.map(jnp.add, f0, df)

  return f_lin


def taylor_expand(f: ApplyFn, params: PyTree, degree: int) -> ApplyFn:
  """Degree-`degree` Taylor polynomial of `f` in its parameters around `params`.

  `f_d(p, x) = Σ_{k=0..d} (1/k!) Dᵏf(θ₀, x)[p − θ₀, …, p − θ₀]`, evaluated by nesting
  forward-mode JVPs along the line t ↦ f(θ₀ + t(p − θ₀)), so every JAX primitive is supported.
  Degree 0 is `f(θ₀, x)`, degree 1 equals `linearize`. The cost grows quickly with the degree
  (nested JVPs); degrees up to about 4 are practical.

  Args:
    f: `f(params, x, **kwargs)`.
    params: expansion point θ₀.
    degree: non-negative integer d.

  Returns:
    `f_d(p, x, **kwargs)` with outputs shaped like `f(θ₀, x)`.
  """
  if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
    raise ValueError(f"taylor_expand: `degree` must be a non-negative integer, got {degree!r}.")

  def f_taylor(p: PyTree, x: PyTree, **kwargs) -> PyTree:
    delta = _param_delta(p, params)

    def along_line(t):
      moved = jax.tree.map(lambda p0, d: p0 + t.astype(p0.dtype) * d, params, delta)
      return f(moved, x, **kwargs)

    # derivatives[k](t) is the k-th derivative of the line function; each one is the JVP of
    # the one before, so degree d costs d nested JVPs.
    derivatives = [along_line]
    for _ in range(degree):
      prev = derivatives[-1]
      derivatives.append(
          lambda t, prev=prev: jax.jvp(prev, (t,), (jnp.ones_like(t),))[1])
    t0 = jnp.zeros((), dtype=jnp.result_type(*jax.tree.leaves(params)))
    terms = [jax.tree.map(lambda y, k=k: y / math.factorial(k), g(t0))
             for k, g in enumerate(derivatives)]
    return jax.tree.map(lambda *ys: sum(ys[1:], ys[0]), *terms)

  return f_taylor
