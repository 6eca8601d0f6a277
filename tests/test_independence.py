"""The per-example analysis must never claim independence falsely, and should find it in the
common models, so that `empirical_ntk_fn(f)` with default arguments takes the fast path."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_dynamics as nd
from ntk_dynamics.kernels.independence import is_per_example

X = jnp.asarray(np.random.RandomState(0).randn(5, 3, 4))
P = {"w": jnp.ones((12, 3)), "b": jnp.ones(3)}


def flat(x):
  return x.reshape(x.shape[0], -1)


def _haiku(fn, x, *args):
  m = hk.without_apply_rng(hk.transform(fn))
  return m.apply, m.init(jax.random.PRNGKey(0), x, *args)


def _cnn(x):
  h = jax.nn.relu(hk.Conv2D(4, 3, stride=2, rate=1)(x))
  h = hk.Conv2D(4, 3, feature_group_count=2, rate=2)(h)
  h = hk.LayerNorm(-1, True, True)(h)
  return hk.Linear(3)(hk.Flatten()(h))


def _embed_attention(t):
  e = hk.Embed(10, 6)(t)
  a = hk.MultiHeadAttention(2, 3, w_init=hk.initializers.VarianceScaling(1.0))(e, e, e)
  return hk.Linear(2)(a.mean(1))


def _vanilla_rnn(x):
  # Haiku's initial state is zeros broadcast to the batch size: the first recurrent matmul
  # multiplies two constants, and the product must stay known-uniform along the batch.
  cell = hk.VanillaRNN(5)
  h = cell.initial_state(x.shape[0])
  for t in range(x.shape[1]):
    _, h = cell(x[:, t], h)
  return hk.Linear(2)(h)


def _lstm_unrolled_by_scan(x):
  core = hk.LSTM(4)
  out, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
  return hk.Linear(2)(out[-1])


def _gru(x):   # its gates come from one matmul, `split` along the features
  core = hk.GRU(4)
  h = core.initial_state(x.shape[0])
  for t in range(x.shape[1]):
    _, h = core(x[:, t], h)
  return hk.Linear(2)(h)


def _scan_mixing_carry(p, x):
  def step(h, xt):
    h = jnp.tanh(xt @ p["w"][:4] + h - h.mean(0))   # the carry mixes examples
    return h, h
  h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
  return h


INDEPENDENT = {
    "mlp": (lambda p, x: jax.nn.relu(jnp.tanh(flat(x) @ p["w"]) + p["b"]), P, X),
    "pytree out": (lambda p, x: {"a": flat(x) @ p["w"], "b": (flat(x) ** 2).sum(-1)}, P, X),
    "transpose back": (lambda p, x: (flat(x).T * 2.0).T @ p["w"], P, X),
    "cnn": _haiku(_cnn, jnp.ones((4, 8, 8, 2))) + (jnp.ones((4, 8, 8, 2)),),
    "embedding+attention over tokens": _haiku(_embed_attention, jnp.ones((4, 7), jnp.int32))
                                       + (jnp.ones((4, 7), jnp.int32),),
    "recurrent state broadcast over the batch": _haiku(_vanilla_rnn, X) + (X,),
    "lstm unrolled by scan": _haiku(_lstm_unrolled_by_scan, X) + (X,),
    "gru gates split from one matmul": _haiku(_gru, X) + (X,),
    "scan over time, per-example ys": (
        lambda p, x: jax.lax.scan(lambda c, xt: (c, jnp.tanh(xt @ p["w"][:4])), 0.,
                                  jnp.swapaxes(x, 0, 1))[1].sum(0), P, X),
}

MIXING = {
    "batch mean": (lambda p, x: flat(x) @ p["w"] - (flat(x) @ p["w"]).mean(0), P, X),
    "position over batch": (lambda p, x: flat(x) @ p["w"] + jnp.arange(5.0)[:, None], P, X),
    "position over batch through a matmul": (
        lambda p, x: flat(x) @ p["w"] + jnp.arange(5.0)[:, None] @ jnp.ones((1, 3)), P, X),
    "attention across batch": (
        lambda p, x: jax.nn.softmax(flat(x) @ flat(x).T) @ (flat(x) @ p["w"]), P, X),
    "roll over batch": (lambda p, x: jnp.roll(flat(x) @ p["w"], 1, axis=0), P, X),
    "flatten batch away": (lambda p, x: (x.reshape(-1, 12) @ p["w"]).reshape(-1), P, X),
    "batch max": (lambda p, x: flat(x) @ p["w"] * jnp.max(x), P, X),
    "cumsum over batch": (lambda p, x: jnp.cumsum(flat(x) @ p["w"], axis=0), P, X),
    "sort over batch": (lambda p, x: jnp.sort(flat(x) @ p["w"], axis=0), P, X),
    "scan over the batch": (
        lambda p, x: jax.lax.scan(lambda c, xi: (c + flat(xi[None]) @ p["w"], c), jnp.zeros(
            (1, 3)), x)[1][:, 0], P, X),
    "scan carry mixing examples": (_scan_mixing_carry, P, X),
    "split along the batch": (
        lambda p, x: jnp.concatenate(jnp.split(flat(x) @ p["w"], [1], axis=0)[::-1]), P, X),
}


def _rnn_with_configured_batch(p, x):
  h = jnp.zeros((5, 3))  # state sized by a batch size fixed in advance
  for t in range(x.shape[1]):
    h = jnp.tanh(x[:, t] @ p["w"][:4] + h)
  return h + p["b"]


# Per-example in the jaxpr traced at the full batch, but not the same program on one example.
BATCH_SIZE_DEPENDENT = {
    "divides by the batch size": (lambda p, x: flat(x) @ p["w"] / x.shape[0], P, X),
    "state sized by a configured batch": (_rnn_with_configured_batch, P, X),
    "branch on the batch size": (
        lambda p, x: flat(x) @ p["w"] * (2. if x.shape[0] > 1 else 1.), P, X),
}


@pytest.mark.parametrize("name", BATCH_SIZE_DEPENDENT)
def test_batch_size_dependent_model_takes_the_whole_batch_path(name):
  f, params, x = BATCH_SIZE_DEPENDENT[name]
  assert not is_per_example(f, params, x)
  jac = jax.jacrev(f)(params, x)
  ref = sum(j.reshape(5, 3, -1).transpose(0, 2, 1).reshape(5, -1) @
            j.reshape(5, 3, -1).transpose(0, 2, 1).reshape(5, -1).T
            for j in jax.tree.leaves(jac)) / 3
  np.testing.assert_allclose(nd.empirical_ntk_fn(f)(x, None, params), ref, rtol=1e-12,
                             atol=1e-12)


@pytest.mark.parametrize("name", INDEPENDENT)
def test_finds_independence(name):
  f, params, x = INDEPENDENT[name]
  assert is_per_example(f, params, x)


@pytest.mark.parametrize("name", MIXING)
def test_never_claims_false_independence(name):
  f, params, x = MIXING[name]
  assert not is_per_example(f, params, x)
  # Cross-check that the model really is not per-example: evaluating one example at a time
  # changes the outputs or their shapes, or the input Jacobian couples examples.
  out = jax.tree.leaves(f(params, x))[0]
  single = jax.vmap(lambda xi: jax.tree.leaves(f(params, xi[None]))[0][0])(x)
  if out.shape == single.shape and np.allclose(out, single):
    jac = np.asarray(jax.jacfwd(lambda xx: jax.tree.leaves(f(params, xx))[0])(x))
    jac = jac.reshape(out.shape[0], -1, x.shape[0], x[0].size)
    off_diagonal = jac * (1 - np.eye(x.shape[0]))[:, None, :, None]
    assert np.any(off_diagonal != 0)


def test_batchnorm_train_mixes_eval_does_not():
  def fwd(x, is_training):
    return hk.Linear(3)(hk.BatchNorm(True, True, 0.9)(hk.Flatten()(x), is_training))
  m = hk.without_apply_rng(hk.transform_with_state(fwd))
  params, state = m.init(jax.random.PRNGKey(0), X, True)
  assert not is_per_example(lambda p, x: m.apply(p, state, x, True)[0], params, X)
  assert is_per_example(lambda p, x: m.apply(p, state, x, False)[0], params, X)


def test_default_call_matches_explicit_vmap_and_mixing_model_stays_exact():
  # A mixing model through the default path must equal the whole-batch reference.
  f, params, x = MIXING["batch mean"]
  jac = jax.jacrev(f)(params, x)
  ref = sum(j.reshape(5, -1) @ j.reshape(5, -1).T for j in jax.tree.leaves(jac)) / 3
  np.testing.assert_allclose(nd.empirical_ntk_fn(f)(x, None, params), ref, rtol=1e-5,
                             atol=1e-5)
  # Independent models: defaults equal the certified per-example call.
  for name in ("mlp", "recurrent state broadcast over the batch", "lstm unrolled by scan",
               "gru gates split from one matmul"):
    f, params, x = INDEPENDENT[name]
    np.testing.assert_allclose(nd.empirical_ntk_fn(f)(x, None, params),
                               nd.empirical_ntk_fn(f, vmap_axes=0)(x, None, params),
                               rtol=1e-6, atol=1e-6)
