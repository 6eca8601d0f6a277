"""Regression tests from a QA pass over the public empirical-NTK API: keyword arguments whose
names clash with internal parameters, `vmap_axes` whose out_axes do not hold the batch,
traced/diagonal axes of different sizes, and the autotuner's cache and errors.

Every kernel is compared with a float64 brute-force reference (`tests.zoo.reference_ntk`:
`jax.jacrev`, then an explicit contraction).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_dynamics as nd
from ntk_dynamics import NtkImplementation as Impl
from tests.zoo import assert_close, reference_ntk

IMPLEMENTATIONS = (Impl.JACOBIAN_CONTRACTION, Impl.NTK_VECTOR_PRODUCTS,
                   Impl.STRUCTURED_DERIVATIVES)


def _setup(k: int = 2):
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 5)) / 2, "w2": rng.normal(size=(5, k)) / 2}
  return params, rng.normal(size=(3, 3)), rng.normal(size=(4, 3))


def mlp(params, inputs):
  return jnp.tanh(inputs @ params["w1"]) @ params["w2"]


def scaled(params, inputs, *, p, i, x, x_i, leaf):
  """A model whose kwargs are named like the internal functions' own parameters (`p`, e.g.
  a dropout rate; `i`, a layer index; ...)."""
  return mlp(params, inputs) * p + i * x - x_i * leaf


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_kwargs_named_like_internal_parameters(implementation, vmap_axes):
  # Used to fail with "got multiple values for argument 'p'" (Jacobian contraction),
  # "... 'x_i'", or an indexing error for `i` (per-parameter NTK-vector products).
  params, x1, x2 = _setup()
  kwargs = {"p": jnp.asarray(1.5), "i": jnp.asarray(2.0), "x": jnp.asarray(0.5),
            "x_i": jnp.asarray(3.0), "leaf": jnp.asarray(-1.0)}
  fn = nd.empirical_ntk_fn(scaled, trace_axes=(), vmap_axes=vmap_axes,
                           implementation=implementation, per_parameter=True)
  got = fn(x1, x2, params, **kwargs)
  want = reference_ntk(scaled, params, x1, x2, (), (), kwargs, per_parameter=True)
  assert_close(got, want)


def test_kwargs_named_like_internal_parameters_given_per_side():
  params, x1, x2 = _setup()
  fn = nd.empirical_ntk_fn(scaled, vmap_axes=(0, 0, {"p": 0}),
                           implementation=Impl.JACOBIAN_CONTRACTION)
  p1, p2 = np.linspace(1, 2, 3)[:, None], np.linspace(-1, 1, 4)[:, None]
  rest = {"i": 1.0, "x": 0.0, "x_i": 0.0, "leaf": 0.0}
  got = fn(x1, x2, params, p=(p1, p2), **rest)
  j = [jax.jacrev(lambda q, xx=xx, pp=pp: scaled(q, xx, p=pp, **rest))(params)
       for xx, pp in ((x1, p1), (x2, p2))]
  flat = [np.concatenate([np.reshape(a, (a.shape[0], a.shape[1], -1))
                          for a in jax.tree.leaves(jj)], axis=-1) for jj in j]
  assert_close(got, np.einsum("akp,bkp->ab", *flat) / 2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model,vmap_axes", [
    (mlp, (0, 1, None)),                        # (N, 1) outputs, batch declared on axis 1
    (lambda p, x: mlp(p, x).T, 0),              # (1, N) outputs, batch declared on axis 0
])
def test_vmap_out_axes_must_hold_the_batch(implementation, model, vmap_axes):
  # Jacobian contraction used to return a wrong kernel here without any error.
  params, x1, x2 = _setup(k=1)
  fn = nd.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes,
                           implementation=implementation)
  with pytest.raises(ValueError, match=r"out_axes.*\(3, 1\)|out_axes.*\(1, 3\)") as info:
    fn(x1, x2, params)
  assert "expected 3" in str(info.value)


def test_traced_axis_of_different_sizes_names_the_argument_and_shapes():
  params, x1, x2 = _setup()

  def first_logit(p, x):  # (N,) outputs: the default trace_axes=(-1,) trace the batch axis
    return mlp(p, x)[:, 0]

  with pytest.raises(ValueError, match=r"`trace_axes`=\(-1,\).*\(3,\).*\(4,\)"):
    nd.empirical_ntk_fn(first_logit)(x1, x2, params)
  with pytest.raises(ValueError, match=r"`diagonal_axes`=\(0,\).*\(3, 2\).*\(4, 2\)"):
    nd.empirical_ntk_fn(mlp, diagonal_axes=(0,))(x1, x2, params)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"null", b"\xff\xfe\x00"])
def test_autotune_ignores_a_corrupt_cache_file(tmp_path, content):
  # A truncated or foreign cache file used to crash every call (JSONDecodeError,
  # AttributeError); it only saves time, so it is ignored with a warning and rewritten.
  params, x1, _ = _setup()
  cache = tmp_path / "autotune.json"
  cache.write_bytes(content)
  fn = nd.autotuned_ntk_fn(mlp, trace_axes=(), cache_path=cache,
                           candidates=[Impl.JACOBIAN_CONTRACTION])
  with pytest.warns(UserWarning, match="autotune cache"):
    got = fn(x1, None, params)
  assert_close(got, reference_ntk(mlp, params, x1, None, (), ()))
  stored = json.loads(cache.read_text())
  assert list(stored.values()) == ["JACOBIAN_CONTRACTION"]


def test_autotune_raises_the_argument_error_not_a_generic_one():
  # Used to raise RuntimeError("every candidate implementation failed"), hiding which
  # argument was wrong.
  params, x1, _ = _setup()
  fn = nd.autotuned_ntk_fn(mlp)
  with pytest.raises(ValueError, match=r"feature shapes.*\(3, 3\).*\(4, 5\)"):
    fn(x1, np.zeros((4, 5)), params)
  with pytest.raises(ValueError, match="params"):
    fn(x1, None, {"w1": params["w1"]})


@pytest.mark.parametrize("repeats", [1.5, "2", True])
def test_autotune_repeats_must_be_a_positive_int(repeats):
  # 1.5 used to be accepted, then every candidate failed in range(1.5) at the first call.
  with pytest.raises(ValueError, match="repeats"):
    nd.autotuned_ntk_fn(mlp, repeats=repeats)
