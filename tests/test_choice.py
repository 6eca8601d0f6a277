"""AUTO's cost model and measured autotuning."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_dynamics as nd
from ntk_dynamics.kernels import axes, batching, choice

Impl = nd.NtkImplementation


def mlp(params, x):
  for w in params[:-1]:
    x = jnp.tanh(x @ w)
  return x @ params[-1]


def _setup(widths=(16, 64, 64, 3), n=6):
  keys = jax.random.split(jax.random.PRNGKey(0), len(widths))
  params = [jax.random.normal(k, (a, b)) / np.sqrt(a)
            for k, a, b in zip(keys, widths[:-1], widths[1:])]
  x = jax.random.normal(keys[-1], (n, widths[0]))
  return params, x


def test_model_prefers_structured_for_wide_dense_layers():
  params, x = _setup(widths=(32, 512, 512, 10), n=16)
  fx = jax.eval_shape(mlp, params, x)
  for trace_axes in [(), (-1,)]:
    costs = choice.estimate_flops(mlp, params, x, None, {}, axes.OutputAxes.create(trace_axes, ()),
                                  batching.VmapAxes(0, 0, {}), fx, fx)
    assert set(costs) == set(Impl) - {Impl.AUTO}
    assert min(costs, key=costs.get) == Impl.STRUCTURED_DERIVATIVES
    # Jacobian contraction of the full kernel pays (N·O)²·P multiply-adds at least.
    n_params = sum(p.size for p in params)
    if trace_axes == ():
      assert costs[Impl.JACOBIAN_CONTRACTION] >= 2 * (16 * 10) ** 2 * n_params


def test_large_embedding_is_not_given_to_ntk_vector_products():
  # Few FLOPs but a large table: every VP column writes and reads a table-sized vector, which
  # made VP 14x slower than structured derivatives when the model counted FLOPs alone.
  vocab, d, n, t = 20000, 32, 8, 6
  params = {"table": jnp.ones((vocab, d)), "w": jnp.ones((d, 10))}

  def f(p, ids):
    return jnp.tanh(p["table"][ids].mean(1)) @ p["w"]

  ids = jnp.zeros((n, t), jnp.int32)
  fx = jax.eval_shape(f, params, ids)
  costs = choice.estimate_flops(f, params, ids, ids, {}, axes.OutputAxes.create((-1,), ()),
                                batching.VmapAxes(0, 0, {}), fx, fx)
  n_params = vocab * d + d * 10
  assert costs[Impl.NTK_VECTOR_PRODUCTS] >= n * 10 * choice.VP_FLOPS_PER_PARAMETER * n_params
  assert min(costs, key=costs.get) == Impl.STRUCTURED_DERIVATIVES


@pytest.mark.parametrize("length", [1, 12])
def test_scan_bodies_count_once_per_step(length):
  # A scan's body runs `length` times: counted once, an hk.dynamic_unroll LSTM looked 12x
  # cheaper to NTK-vector products than it is, and AUTO picked them (1.6x the fastest).
  from ntk_dynamics.kernels.structured.cost import jaxpr_macs
  w = jnp.ones((8, 8))
  step = lambda c, _: (c @ w, None)  # noqa: E731
  jaxpr = jax.make_jaxpr(lambda h: jax.lax.scan(step, h, None, length=length)[0])(
      jnp.ones((4, 8))).jaxpr
  assert jaxpr_macs(jaxpr) == length * 4 * 8 * 8


def test_recurrent_carry_pays_its_backward_pass_at_every_step():
  # A state that starts as zeros depends on the weights from the second step on, so each
  # step's backward pass propagates through h @ w. Read once, without the carry's fixed point,
  # only the step's elementwise tail was counted: a 12-step LSTM's cotangents came out ~10x
  # too cheap. The scan must cost what the same loop written in Python costs, but for its
  # first step, which a per-step count charges like the others.
  from ntk_dynamics.kernels.structured import cost
  w = jnp.ones((8, 8)) * 0.1

  def scanned(p, x):
    h, _ = jax.lax.scan(lambda h, x_t: (jnp.tanh(h @ p + x_t), None), jnp.zeros(8), x)
    return h

  def looped(p, x):
    h = jnp.zeros(8)
    for t in range(x.shape[0]):
      h = jnp.tanh(h @ p + x[t])
    return h

  x = jnp.ones((12, 8))
  macs = []
  for f in (scanned, looped):
    jaxpr = jax.make_jaxpr(f)(w, x).jaxpr
    macs.append(cost.backward_macs(jaxpr, [True, False], [True, False]))
  assert macs[1] <= macs[0] <= macs[1] * 12 / 11


def test_auto_equals_every_implementation():
  params, x = _setup()
  ref = nd.empirical_ntk_fn(mlp, (), (), 0, Impl.JACOBIAN_CONTRACTION)(x, None, params)
  np.testing.assert_allclose(nd.empirical_ntk_fn(mlp, trace_axes=())(x, None, params), ref,
                             rtol=1e-5, atol=1e-6)


def test_autotune_picks_once_and_persists(tmp_path):
  params, x = _setup()
  cache = tmp_path / "autotune.json"
  fn = choice.autotuned_ntk_fn(mlp, trace_axes=(), vmap_axes=0, cache_path=cache)
  out = fn(x, None, params)
  ref = nd.empirical_ntk_fn(mlp, (), (), 0, Impl.JACOBIAN_CONTRACTION)(x, None, params)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert len(fn.choices) == 1
  stored = json.loads(cache.read_text())
  assert list(stored.values()) == list(fn.choices.values())
  # A new function (as in a new process) reads the choice from disk instead of timing.
  same = choice.autotuned_ntk_fn(mlp, trace_axes=(), vmap_axes=0, cache_path=cache)
  same(x, None, params)
  assert same.choices == fn.choices
  # A stored choice outside the candidates is ignored and the candidates are timed.
  only_vp = choice.autotuned_ntk_fn(mlp, trace_axes=(), vmap_axes=0, cache_path=cache,
                                    candidates=[Impl.NTK_VECTOR_PRODUCTS])
  np.testing.assert_allclose(only_vp(x, None, params), ref, rtol=1e-5, atol=1e-6)
  assert list(only_vp.choices.values()) == ["NTK_VECTOR_PRODUCTS"]
  # Different shapes are tuned separately.
  fn(x[:4], None, params)
  assert len(fn.choices) == 2


def test_autotune_under_jit_uses_the_model():
  params, x = _setup()
  fn = choice.autotuned_ntk_fn(mlp, vmap_axes=0)
  out = jax.jit(lambda p: fn(x, None, p))(params)
  np.testing.assert_allclose(out, nd.empirical_ntk_fn(mlp, vmap_axes=0)(x, None, params),
                             rtol=1e-5, atol=1e-6)
  assert fn.choices == {}


def test_autotune_rejects_bad_repeats():
  with pytest.raises(ValueError, match="repeats"):
    choice.autotuned_ntk_fn(mlp, repeats=0)
