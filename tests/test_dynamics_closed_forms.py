"""Closed-form MSE dynamics against explicit training of the linearized model (float64).

References never use the function-space eigendecomposition: discrete steps run `optax.sgd`
on `linearize(f, params)`; flows solve the parameter-space ODE of the (quadratic) loss with
`scipy.linalg.expm`. Kernels are computed here with `jax.jacrev`.
"""
from __future__ import annotations

import dataclasses
import functools
from decimal import Decimal, localcontext
from typing import Any, Callable, Optional

import jax

jax.config.update("jax_enable_x64", True)

import haiku as hk  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from ntk_dynamics import dynamics  # noqa: E402
from ntk_dynamics.dynamics import modes  # noqa: E402
from ntk_dynamics.linearize import linearize  # noqa: E402

RTOL = 1e-8
STEPS = 60


LOSSES = {
    "mse": lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2),
    "cross_entropy": lambda fx, y: optax.softmax_cross_entropy(fx, y).mean(),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A model, its data, and its Jacobians and reference kernels at the initial parameters."""
  f: Callable[..., jax.Array]
  params: Any
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  trace_axes: tuple
  jac_train: np.ndarray  # (n_train, k, P)
  jac_test: np.ndarray  # (n_test, k, P)

  @property
  def fx_train_0(self):
    return self.f(self.params, self.x_train)

  @property
  def fx_test_0(self):
    return self.f(self.params, self.x_test)

  def _kernel(self, j1):
    full = np.einsum("iap,jbp->ijab", j1, self.jac_train)
    return np.einsum("ijaa->ij", full) / full.shape[-1] if self.trace_axes else full

  @property
  def k_train_train(self):
    return self._kernel(self.jac_train)

  @property
  def k_test_train(self):
    return self._kernel(self.jac_test)

  def kernel_matrix(self) -> np.ndarray:
    """The train-train kernel flattened to (A, A) (zipped -> row-major over (n, k))."""
    k = self.k_train_train
    return k if k.ndim == 2 else k.transpose(0, 2, 1, 3).reshape(k.shape[0] * k.shape[2], -1)

  def absolute_reg(self, diag_reg: float) -> float:
    """ρ for a relative `diag_reg`: diag_reg × mean diagonal of the flattened kernel."""
    return float(diag_reg * np.mean(np.diagonal(self.kernel_matrix())))


def _problem(f, params, rng, n_train, n_test, d, k, traced) -> Problem:
  x_train = jnp.asarray(rng.normal(size=(n_train, d)))
  x_test = jnp.asarray(rng.normal(size=(n_test, d)))
  y_train = jnp.asarray(rng.normal(size=(n_train, k)))
  flat, unravel = ravel_pytree(params)
  jac = jax.jit(lambda x: jax.jacrev(lambda p: f(unravel(p), x))(flat))
  return Problem(f, params, x_train, y_train, x_test, (-1,) if traced else (),
                 np.asarray(jac(x_train)), np.asarray(jac(x_test)))


@functools.lru_cache(maxsize=None)
def random_features_problem(width: int = 12, seed: int = 0) -> Problem:
  """Trained readout on fixed tanh features: Θ_full = Θ ⊗ I exactly, so a traced kernel is
  exact for this model."""
  rng = np.random.default_rng(seed)
  d, k = 3, 2
  v = jnp.asarray(rng.normal(size=(d, width)))

  def f(p, x):
    return jnp.tanh(x @ v + 0.3) @ p["w"] + p["b"]

  params = {"w": jnp.asarray(rng.normal(size=(width, k)) / np.sqrt(width)),
            "b": jnp.asarray(0.1 * rng.normal(size=(k,)))}
  return _problem(f, params, rng, 8, 5, d, k, traced=True)


@functools.lru_cache(maxsize=None)
def mlp_problem(seed: int = 1) -> Problem:
  """A Haiku tanh MLP with all parameters trained; its full (n, n, k, k) kernel."""
  rng = np.random.default_rng(seed)
  d, k = 3, 3
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([8, 8, k], activation=jnp.tanh)(x)))
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, d)))
  return _problem(net.apply, params, rng, 6, 4, d, k, traced=False)


PROBLEMS = {"traced": random_features_problem, "full": mlp_problem}


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def problem(request) -> Problem:
  return PROBLEMS[request.param]()


@functools.lru_cache(maxsize=None)
def _sgd_runner(problem: Problem, loss_name: str, steps: int):
  """Jitted training of `linearize(f, params)` by optax.sgd, compiled once per problem.

  The trained parameters are θ and, for `slack` > 0, a free offset c per training output:
  train outputs f_lin(θ, x_train) + √slack c (the model whose train-train kernel is
  Θ + slack·I); `weight_decay` adds (weight_decay/2)‖θ − θ₀‖² to the loss.
  """
  f_lin = linearize(problem.f, problem.params)
  loss_fn = LOSSES[loss_name]

  def run(lr, momentum, slack, weight_decay):
    def outputs(p):
      train = f_lin(p["net"], problem.x_train) + jnp.sqrt(slack) * p["slack"]
      return train, f_lin(p["net"], problem.x_test)

    def loss(p):
      delta = ravel_pytree(jax.tree.map(jnp.subtract, p["net"], problem.params))[0]
      return loss_fn(outputs(p)[0], problem.y_train) + 0.5 * weight_decay * delta @ delta

    opt = optax.sgd(lr, momentum)  # momentum 0 is plain gradient descent

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(jax.grad(loss)(p), state)
      return (optax.apply_updates(p, updates), state), outputs(p)

    p0 = {"net": problem.params, "slack": jnp.zeros_like(problem.y_train)}
    (p_last, _), (train, test) = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    last_train, last_test = outputs(p_last)
    return (jnp.concatenate([train, last_train[None]]),
            jnp.concatenate([test, last_test[None]]))

  return jax.jit(run)


def sgd_trajectory(problem: Problem, lr: float, steps: int, momentum: float = 0.,
                   slack: float = 0., weight_decay: float = 0., loss: str = "mse"):
  """Outputs (train, test) after 0..steps steps of optax.sgd, stacked on axis 0."""
  return _sgd_runner(problem, loss, steps)(lr, momentum, slack, weight_decay)


def flow_reference(problem: Problem, lr: float, times, momentum: Optional[float] = None,
                   slack: float = 0., weight_decay: float = 0.):
  """Outputs at `times` (in steps) of the parameter-space flow z' = −η∇L(z), or of the
  heavy-ball ODE z'' + (1 − m)z' = −η∇L(z), z'(0) = 0, for the MSE loss of the linearized
  model (parameters z = (θ − θ₀, slack offsets) as in `_sgd_runner`). The loss is quadratic,
  ∇L = H z + g, so `scipy.linalg.expm` solves it exactly."""
  n_out = problem.y_train.size
  jac = problem.jac_train.reshape(n_out, -1)
  n_par = jac.shape[1]
  b = np.concatenate([jac, np.sqrt(slack) * np.eye(n_out)], axis=1)  # train outputs per z
  r0 = np.asarray(problem.fx_train_0 - problem.y_train).ravel()
  hess = b.T @ b / n_out
  hess[:n_par, :n_par] += weight_decay * np.eye(n_par)
  grad0 = b.T @ r0 / n_out
  p = hess.shape[0]
  if momentum is None:  # state (z, 1)
    gen = np.zeros((p + 1, p + 1))
    gen[:p, :p], gen[:p, p] = -lr * hess, -lr * grad0
  else:  # state (z, z', 1)
    gen = np.zeros((2 * p + 1, 2 * p + 1))
    gen[:p, p:2 * p] = np.eye(p)
    gen[p:2 * p, :p] = -lr * hess
    gen[p:2 * p, p:2 * p] = -(1. - momentum) * np.eye(p)
    gen[p:2 * p, 2 * p] = -lr * grad0
  z = np.stack([scipy.linalg.expm(t * gen)[:p, -1] for t in times])
  train = np.asarray(problem.fx_train_0) + (z @ b.T).reshape((-1,) + problem.y_train.shape)
  test = np.asarray(problem.fx_test_0) + np.einsum(
      "iap,tp->tia", problem.jac_test, z[:, :n_par])
  return train, test


def assert_close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err <= rtol, f"relative error {err:.3g} > {rtol:.1g}"


def stable_lr(problem: Problem, fraction: float, momentum: float = 0.) -> float:
  """`fraction` of the largest stable step 2(1+m)N/λ_max, computed here with numpy."""
  lam_max = np.linalg.eigvalsh(problem.kernel_matrix())[-1]
  return fraction * 2 * (1 + momentum) * problem.y_train.size / lam_max


def _predict(factory, problem, t, **kwargs):
  predict = factory(problem.k_train_train, problem.y_train, trace_axes=problem.trace_axes,
                    **kwargs)
  return predict(t, problem.fx_train_0, problem.fx_test_0, problem.k_test_train)


@pytest.mark.parametrize("diag_reg", [0., 0.3])
def test_flow_matches_parameter_space_flow(problem, diag_reg):
  lr = stable_lr(problem, 0.5)
  rho = problem.absolute_reg(diag_reg)
  times = [0., 0.7, 5., 60.]
  train, test = _predict(dynamics.gradient_descent_mse, problem, jnp.array(times),
                         learning_rate=lr, diag_reg=diag_reg)
  ref_train, ref_test = flow_reference(problem, lr, times, slack=rho)
  assert_close(train, ref_train)
  assert_close(test, ref_test)


@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("diag_reg", [0., 0.3])
def test_steps_match_optax_sgd(problem, momentum, diag_reg):
  m = momentum or 0.
  lr = stable_lr(problem, 0.45, m)
  rho = problem.absolute_reg(diag_reg)
  train, test = _predict(dynamics.gradient_descent_mse_steps, problem, jnp.arange(STEPS + 1),
                         learning_rate=lr, momentum=m, diag_reg=diag_reg)
  ref_train, ref_test = sgd_trajectory(problem, lr, STEPS, m, slack=rho)
  assert_close(train, ref_train)
  assert_close(test, ref_test)


@pytest.mark.parametrize("diag_reg", [0., 0.3])
def test_momentum_flow_matches_parameter_space_ode(problem, diag_reg):
  lr, m = stable_lr(problem, 0.05), 0.8
  rho = problem.absolute_reg(diag_reg)
  times = [0., 1.5, 12., 90.]
  train, test = _predict(dynamics.momentum_flow_mse, problem, jnp.array(times),
                         learning_rate=lr, momentum=m, diag_reg=diag_reg)
  ref_train, ref_test = flow_reference(problem, lr, times, m, slack=rho)
  assert_close(train, ref_train)
  assert_close(test, ref_test)


def test_diag_reg_is_weight_decay_on_test_points(problem):
  """ρ on the train kernel = L2 term (ρ/2N)‖θ − θ₀‖²: same test outputs, and the network's
  own train outputs are the test predictions at x_test = x_train."""
  lr, m = stable_lr(problem, 0.4, 0.5), 0.5
  rho = problem.absolute_reg(0.5)
  predict = dynamics.gradient_descent_mse_steps(
      problem.k_train_train, problem.y_train, lr, momentum=m, diag_reg=rho,
      diag_reg_absolute_scale=True, trace_axes=problem.trace_axes)
  ks = jnp.arange(STEPS + 1)
  _, test = predict(ks, problem.fx_train_0, problem.fx_test_0, problem.k_test_train)
  _, net_train = predict(ks, problem.fx_train_0, problem.fx_train_0, problem.k_train_train)
  ref_train, ref_test = sgd_trajectory(problem, lr, STEPS, m,
                                       weight_decay=rho / problem.y_train.size)
  assert_close(test, ref_test)
  assert_close(net_train, ref_train)


def test_relative_and_absolute_diag_reg_agree(problem):
  rho = problem.absolute_reg(0.2)
  kw = dict(learning_rate=stable_lr(problem, 0.5), trace_axes=problem.trace_axes)
  rel = dynamics.gradient_descent_mse(problem.k_train_train, problem.y_train, diag_reg=0.2, **kw)
  ab = dynamics.gradient_descent_mse(problem.k_train_train, problem.y_train, diag_reg=rho,
                                     diag_reg_absolute_scale=True, **kw)
  args = (problem.fx_train_0, problem.fx_test_0, problem.k_test_train)
  for a, b in zip(rel(3., *args), ab(3., *args)):
    assert_close(a, b, 1e-13)


FACTORIES = {"flow": (dynamics.gradient_descent_mse, {}, 1e7),
             "steps": (dynamics.gradient_descent_mse_steps, {"momentum": 0.6}, 10**7),
             "momentum_flow": (dynamics.momentum_flow_mse, {"momentum": 0.6}, 1e7)}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("diag_reg", [0., 0.1])
def test_infinite_time_equals_large_time(problem, name, diag_reg):
  factory, kwargs, big = FACTORIES[name]
  lr = stable_lr(problem, 0.5, kwargs.get("momentum", 0.))
  predict = factory(problem.k_train_train, problem.y_train, lr, diag_reg=diag_reg,
                    trace_axes=problem.trace_axes, **kwargs)
  args = (problem.fx_train_0, problem.fx_test_0, problem.k_test_train)
  inf_train, inf_test = predict(None, *args)
  big_train, big_test = predict(big, *args)
  np.testing.assert_array_equal(inf_train, problem.y_train)
  assert_close(big_train, inf_train, 1e-9)
  assert_close(big_test, inf_test, 1e-9)
  # Kernel regression, independently of the library's solver.
  mat = problem.kernel_matrix()
  mat = mat + problem.absolute_reg(diag_reg) * np.eye(mat.shape[0])
  residual = np.asarray(problem.y_train - problem.fx_train_0)
  if problem.trace_axes:
    expected = problem.fx_test_0 + problem.k_test_train @ np.linalg.solve(mat, residual)
  else:
    k_te = problem.k_test_train
    k_te = k_te.transpose(0, 2, 1, 3).reshape(k_te.shape[0] * k_te.shape[2], -1)
    expected = problem.fx_test_0 + (k_te @ np.linalg.solve(mat, residual.ravel())).reshape(
        problem.fx_test_0.shape)
  assert_close(inf_test, expected, 1e-10)


def test_rank_deficient_kernel_zero_modes_are_exact():
  """Fewer features than training points: Θ has (numerically) zero eigenvalues. Closed forms
  stay exact (no division by λ) and t=None keeps the null-space part of the residual."""
  problem = random_features_problem(width=3)
  lam = np.linalg.eigvalsh(np.asarray(problem.k_train_train))
  assert lam[0] < 1e-12 * lam[-1]
  lr = stable_lr(problem, 0.5)
  train, test = _predict(dynamics.gradient_descent_mse_steps, problem, jnp.arange(STEPS + 1),
                         learning_rate=lr)
  ref_train, ref_test = sgd_trajectory(problem, lr, STEPS)
  assert_close(train, ref_train)
  assert_close(test, ref_test)
  flow_train, flow_test = _predict(dynamics.gradient_descent_mse, problem, jnp.array([3., 30.]),
                                   learning_rate=lr)
  ref_train, ref_test = flow_reference(problem, lr, [3., 30.])
  assert_close(flow_train, ref_train)
  assert_close(flow_test, ref_test)
  inf_train, inf_test = _predict(dynamics.gradient_descent_mse, problem, None, learning_rate=lr)
  # Rounding-noise eigenvalues (~1e-16 λ_max) still move a little at very large t.
  big_train, big_test = _predict(dynamics.gradient_descent_mse, problem, 1e6, learning_rate=lr)
  assert_close(big_train, inf_train, 1e-8)
  assert_close(big_test, inf_test, 1e-8)
  assert np.max(np.abs(inf_train - problem.y_train)) > 1e-3  # the null space does not fit


def test_steps_approach_flow_for_small_learning_rate(problem):
  """k steps of size η and the flow at t = k (flow time τ = η k) differ by O(η)."""
  errors = []
  for fraction in [0.02, 0.01]:
    lr, k = stable_lr(problem, fraction), int(round(2. / fraction))  # same τ for both
    steps = _predict(dynamics.gradient_descent_mse_steps, problem, k, learning_rate=lr)
    flow = _predict(dynamics.gradient_descent_mse, problem, float(k), learning_rate=lr)
    errors.append(max(np.max(np.abs(a - b)) for a, b in zip(steps, flow)))
  assert 1.8 < errors[0] / errors[1] < 2.2


def test_momentum_steps_approach_momentum_flow(problem):
  """Discrete heavy ball → its continuous limit at fixed t√η: relative to the distance
  travelled, the two differ by O(√η)."""
  m, errors = 0.7, []
  for fraction in [1e-4, 1e-6]:
    lr = stable_lr(problem, fraction, m)
    k = int(round(0.2 / np.sqrt(fraction)))
    discrete = _predict(dynamics.gradient_descent_mse_steps, problem, k, learning_rate=lr,
                        momentum=m)
    flow = _predict(dynamics.momentum_flow_mse, problem, float(k), learning_rate=lr,
                    momentum=m)
    start = (problem.fx_train_0, problem.fx_test_0)
    errors.append(max(np.max(np.abs(a - b)) / np.max(np.abs(b - c))
                      for a, b, c in zip(discrete, flow, start)))
  assert errors[1] < 1e-2
  assert 8. < errors[0] / errors[1] < 14.  # √100 = 10, approached from above


def test_curves_shapes_jit_and_output_selection(problem):
  predict = dynamics.gradient_descent_mse(problem.k_train_train, problem.y_train, 0.5,
                                          trace_axes=problem.trace_axes)
  t = jnp.linspace(0., 50., 6).reshape(2, 3)
  args = (problem.fx_train_0, problem.fx_test_0, problem.k_test_train)
  train, test = predict(t, *args)
  assert train.shape == (2, 3) + problem.y_train.shape
  assert test.shape == (2, 3) + problem.fx_test_0.shape
  jit_train, jit_test = jax.jit(predict)(t, *args)
  assert_close(jit_train, train, 1e-13)
  assert_close(jit_test, test, 1e-13)
  scalar_train, scalar_test = predict(10., *args)
  assert_close(scalar_train, train[0, 1], 1e-13)
  assert_close(scalar_test, test[0, 1], 1e-13)
  assert predict(t, problem.fx_train_0).shape == train.shape
  # fx_train_0=None: test predictions only, with a zero initial train output (as NT).
  only_test = predict(t, None, problem.fx_test_0, problem.k_test_train)
  expected = predict(t, jnp.zeros_like(problem.y_train), *args[1:])[1]
  assert_close(only_test, expected, 1e-13)
  steps = dynamics.gradient_descent_mse_steps(problem.k_train_train, problem.y_train, 0.5,
                                              momentum=0.5, trace_axes=problem.trace_axes)
  ks = jnp.array([[0, 3], [17, 1000]])
  assert_close(jax.jit(steps)(ks, *args)[1], steps(ks, *args)[1], 1e-13)


# --- float32: long times, rank-deficient and traced kernels ---------------------------------

_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628"
              "6208998628034825342117067982148086513282306647093844609550582231725359408128")


def _decimal_cos_sin(x: Decimal):
  r = x - (x / (2 * _PI)).to_integral_value() * 2 * _PI
  terms, term, n = [Decimal(0)] * 4, Decimal(1), 0
  while n < 6 or abs(term) > Decimal(10) ** -110:  # term = r^n / n!
    terms[n % 4] += term
    n += 1
    term = term * r / n
  return terms[0] - terms[2], terms[1] - terms[3]


def heavy_ball_reference(s: float, t: float, a: float) -> float:
  """g(t) for g'' + a g' + s g = 1, g(0) = g'(0) = 0, in 100-digit decimal arithmetic:
  g = (1 − φ)/s with φ = e^{−at/2}(C + (at/2) S), C = cosh √w, S = sinh(√w)/√w,
  w = (a²/4 − s)t² (cos and sinc for w < 0)."""
  with localcontext() as ctx:
    ctx.prec, ctx.Emax, ctx.Emin = 100, 10**15, -10**15
    s, t, a = Decimal(float(s)), Decimal(float(t)), Decimal(float(a))
    if t == 0:
      return 0.
    if s == 0:
      return float(t / a - (1 - (-a * t).exp()) / (a * a))
    hp, w = a * t / 2, (a * a / 4 - s) * t * t
    if w > 0:
      x = w.sqrt()
      up, down = (x - hp).exp(), (-x - hp).exp()
      c, sh = (up + down) / 2, (up - down) / (2 * x)
    elif w < 0:
      x = (-w).sqrt()
      cos, sin = _decimal_cos_sin(x)
      c, sh = (-hp).exp() * cos, (-hp).exp() * sin / x
    else:
      c = sh = (-hp).exp()
    return float((1 - c - hp * sh) / s)


LONG_TIMES = np.array([0., 1e-3, 0.7, 3., 10., 37., 1e2, 1e4, 1e6, 1e7, 1e9])


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.float64, 1e-10)])
@pytest.mark.parametrize("momentum", [0., 0.9])
def test_momentum_flow_response_is_accurate_at_all_times(dtype, rtol, momentum):
  """Per-mode response of the continuous heavy ball against 100-digit arithmetic for over-,
  under- and critically damped modes, s = 0, tiny and large s, t from 0 to 1e9."""
  a = float(1 - np.asarray(momentum, dtype))
  crit = a * a / 4
  rates = np.array([0., 1e-30, 1e-9, 1e-4, crit * (1 - 1e-3), crit, crit * (1 + 1e-3), 0.4,
                    1.9, 1e3], dtype)
  times = LONG_TIMES.astype(dtype)
  g = np.asarray(modes.heavy_ball_flow(jnp.asarray(rates), jnp.asarray(times), momentum))
  assert g.dtype == dtype
  ref = np.array([[heavy_ball_reference(s, t, a) for s in rates] for t in times])
  assert np.all(g[0] == 0)
  err = np.abs(g[1:] - ref[1:]) / ref[1:]
  assert np.max(err) <= rtol, np.unravel_index(np.argmax(err), err.shape)


@pytest.mark.parametrize("learning_rate,momentum", [(1e-6, 0.), (1e-3, 0.9), ("half", 0.9),
                                                    ("half", 0.)])
def test_momentum_flow_float32_predictions_at_long_times(learning_rate, momentum):
  """Whole float32 predictions (train and test) against a float64 eigendecomposition with the
  decimal per-mode response (float32 used to be off by 0.3 or NaN from t ~ 1e7)."""
  rng = np.random.default_rng(0)
  jac, jac_test = rng.normal(size=(6, 20)), rng.normal(size=(3, 20))
  kernel, k_test = jac @ jac.T, jac_test @ jac.T
  y = rng.normal(size=(6, 2))
  lam, vecs = np.linalg.eigh(kernel)
  n = y.size
  lr = float(0.5 * 2 * (1 + momentum) * n / lam[-1]) if learning_rate == "half" else learning_rate
  times = np.array([10., 1e3, 1e5, 1e7, 1e9], np.float32)
  predict = dynamics.momentum_flow_mse(jnp.asarray(kernel, jnp.float32),
                                       jnp.asarray(y, jnp.float32), lr, momentum=momentum)
  train, test = predict(jnp.asarray(times), 0., 0., jnp.asarray(k_test, jnp.float32))
  assert train.dtype == test.dtype == jnp.float32
  rates = np.float32(lr) * lam / n
  g = np.array([[heavy_ball_reference(s, t, 1 - momentum) for s in rates] for t in times])
  proj = vecs.T @ (0. - y)
  ref_train = -np.einsum("ia,ta,ac->tic", vecs, rates * g, proj)
  ref_test = -np.einsum("ba,ta,ac->tbc", k_test @ vecs, lr / n * g, proj)
  assert_close(train, ref_train, 1e-4)
  assert_close(test, ref_test, 1e-4)


def test_momentum_flow_gradients_are_finite_in_float32():
  """Meta-learning differentiates through the closed forms: gradients in the kernel, the
  learning rate and the momentum stay finite at every time, including s = 0 modes."""
  rng = np.random.default_rng(3)
  jac = rng.normal(size=(5, 3)).astype(np.float32)  # rank 3: two zero modes
  kernel = jnp.asarray(jac @ jac.T)
  y = jnp.asarray(rng.normal(size=(5, 1)), jnp.float32)
  times = jnp.asarray([0., 0.5, 10., 1e3, 1e7, 1e9], jnp.float32)

  def loss(k, lr, m):
    train, test = dynamics.momentum_flow_mse(k, y, lr, momentum=m)(times, 0., 0., k[:2])
    return jnp.sum(train ** 2) + jnp.sum(test ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(kernel, jnp.float32(0.3), jnp.float32(0.9))
  # The same gradients in float64 (x64 is on here) are the reference.
  y32 = y
  y = jnp.asarray(y, jnp.float64)
  # (Its kernel is J Jᵀ formed in float64: exactly rank 3, as the float32 one is up to
  # rounding, which the float32 closed form drops.)
  jac64 = jnp.asarray(jac, jnp.float64)
  want = jax.grad(loss, argnums=(0, 1, 2))(jac64 @ jac64.T, 0.3, 0.9)
  y = y32
  for grad, ref in zip(grads, want):
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(ref))))
  response = lambda s, t, m: modes.heavy_ball_flow(s, t, m).sum()  # noqa: E731
  rates = jnp.asarray([0., 1e-20, 2.5e-3, 0.4, 1e3], jnp.float32)
  got = jax.grad(response, argnums=(0, 1, 2))(rates, times, jnp.float32(0.9))
  want = jax.grad(response, argnums=(0, 1, 2))(jnp.asarray(rates, jnp.float64),
                                               jnp.asarray(times, jnp.float64), 0.9)
  for grad, ref in zip(got, want):
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(ref))))


@pytest.mark.parametrize("momentum", [0., 0.9])
def test_response_derivative_in_the_rate_at_zero(momentum):
  """dg/ds at s = 0 (exact zero modes): −t²/2 for the flow, and the heavy ball's value from
  g = t/a − (1 − e^{−at})/a² − s ∫ ... (checked by a one-sided difference in float64)."""
  t = jnp.asarray([0.5, 4., 30.])
  flow_grad = jax.vmap(jax.grad(lambda s, ti: modes.flow(s[None], ti[None])[0, 0]),
                       (None, 0))(jnp.float64(0.), t)
  np.testing.assert_allclose(flow_grad, -t ** 2 / 2, rtol=1e-12)
  hb = lambda s, ti: modes.heavy_ball_flow(s[None], ti[None], momentum)[0, 0]  # noqa: E731
  hb_grad = jax.vmap(jax.grad(hb), (None, 0))(jnp.float64(0.), t)
  h = 1e-7
  diff = jax.vmap(lambda ti: (hb(jnp.float64(h), ti) - hb(jnp.float64(0.), ti)) / h)(t)
  np.testing.assert_allclose(hb_grad, diff, rtol=1e-5)


def _rank_deficient_float32(seed=1, n=20, m=5, p=8):
  rng = np.random.default_rng(seed)
  jac, jac_test = rng.normal(size=(n, p)), rng.normal(size=(m, p))
  return (jnp.asarray(jac @ jac.T, jnp.float32), jnp.asarray(jac_test @ jac.T, jnp.float32),
          jnp.asarray(rng.normal(size=(n, 1)), jnp.float32), jac, jac_test)


@pytest.mark.parametrize("name,kwargs,big", [
    ("flow", {}, 1e8), ("steps", {}, 10**8), ("steps", {"momentum": 0.5}, 10**8),
    ("momentum_flow", {"momentum": 0.6}, 1e8)])
def test_rank_deficient_float32_converges_to_the_limit(name, kwargs, big):
  """Θ = J Jᵀ (20 x 8) in float32: the 12 null modes are rounding noise (|λ| ~ 1e-7 λ_max).
  They are dropped at finite t as at t=None, so large t agrees with the limit (the test
  predictions used to drift by O(1) at t = 1e8) and with exact kernel regression."""
  kernel, k_test, y, jac, jac_test = _rank_deficient_float32()
  factory = FACTORIES[name][0]
  lam_max = float(np.linalg.eigvalsh(np.asarray(kernel, np.float64))[-1])
  lr = 0.5 * 2 * (1 + kwargs.get("momentum", 0.)) * y.size / lam_max
  predict = factory(kernel, y, lr, **kwargs)
  f0, ft0 = jnp.zeros_like(y), jnp.zeros((5, 1), jnp.float32)
  inf_train, inf_test = predict(None, f0, ft0, k_test)
  t = jnp.asarray([big // 10**4, big], jnp.int32 if name == "steps" else jnp.float32)
  train, test = predict(t, f0, ft0, k_test)
  # Exact float64 answer: the minimum-norm interpolant of y in the row space of J.
  kernel64 = jac @ jac.T
  dual = np.linalg.lstsq(kernel64, np.asarray(y, np.float64), rcond=1e-10)[0]
  exact_test = (jac_test @ jac.T) @ dual
  exact_train = kernel64 @ dual
  for i in range(2):
    assert_close(test[i], exact_test, 1e-4)
    assert_close(train[i], exact_train, 1e-4)
    assert_close(test[i], inf_test, 1e-4)
    assert_close(train[i], inf_train, 1e-4)


def test_singular_kernel_under_jit_matches_eager():
  """A factory called under `jax.jit` decides singularity with a traced predicate: the t=None
  limit is the pseudo-inverse solution, not NaN (Cholesky of a singular matrix)."""
  kernel, k_test, y, _, _ = _rank_deficient_float32()

  def limit(k, yy, diag_reg=0.):
    return dynamics.gradient_descent_mse(k, yy, 1., diag_reg=diag_reg)(None, 0., 0., k_test)

  for diag_reg in [0., 1e-2]:  # 1e-2: nonsingular, condition number ~500
    eager_train, eager_test = limit(kernel, y, diag_reg)
    jit_train, jit_test = jax.jit(limit, static_argnums=2)(kernel, y, diag_reg)
    assert np.all(np.isfinite(jit_test))
    assert_close(jit_test, eager_test, 1e-5)
    assert_close(jit_train, eager_train, 1e-5)
  _, batched_test = jax.vmap(limit)(jnp.stack([kernel, 2 * kernel]), jnp.stack([y, y]))
  _, eager_test = limit(kernel, y)
  assert_close(batched_test[0], eager_test, 1e-4)
  assert_close(batched_test[1], eager_test / 2, 1e-4)  # (2Θ)⁺ = Θ⁺/2, k_test fixed


@pytest.mark.parametrize("kernel_name", ["generic", "degenerate"])
def test_limit_gradients_under_jit_are_finite_for_nonsingular_kernels(kernel_name):
  """`jax.grad` through `gradient_descent_mse(...)(None, ...)` under jit (meta-learning's ridge
  inner loop): finite and equal to the eager gradients, also for exactly repeated eigenvalues
  (2·I), where an eigenvector-based branch would give NaN."""
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(6, 10))
  kernel = feats @ feats.T / 10 if kernel_name == "generic" else 2. * np.eye(6)
  y = rng.normal(size=(6, 2))
  k_test = rng.normal(size=(3, 6))

  def loss(k, yy):
    predict = dynamics.gradient_descent_mse(k, yy, 1., diag_reg=1e-3)
    train, test = predict(None, 0., 0., k_test)
    return jnp.sum(test ** 2) + jnp.sum(train ** 2)

  def reference(k, yy):  # a plain linear solve
    k_reg = k + 1e-3 * jnp.trace(k) / 6 * jnp.eye(6)
    return jnp.sum((k_test @ jnp.linalg.solve(k_reg, yy)) ** 2) + jnp.sum(yy ** 2)

  args = (jnp.asarray(kernel), jnp.asarray(y))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
  expected = jax.grad(reference, argnums=(0, 1))(*args)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert_close(grads[0] + grads[0].T, expected[0] + expected[0].T, 1e-10)  # symmetric part
  assert_close(grads[1], expected[1], 1e-10)


@pytest.mark.parametrize("name", ["flow", "momentum_flow"])
def test_float32_predictions_stay_float32_for_float64_times(name):
  """Times made by numpy (np.linspace, np.arange: float64) must not promote a float32
  prediction to float64 (as `t=None`, the step counts and the ODE do not either)."""
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(5, 8)).astype(np.float32)
  kernel, y = feats @ feats.T / 8, rng.normal(size=(5, 2)).astype(np.float32)
  factory = {"flow": dynamics.gradient_descent_mse, "momentum_flow": dynamics.momentum_flow_mse}
  predict = factory[name](kernel, y, 0.5)
  times = np.linspace(0., 10., 4)
  train, test = predict(times, np.float32(0.), np.float32(0.), kernel)
  assert train.dtype == test.dtype == predict(None, np.float32(0.)).dtype == jnp.float32
  np.testing.assert_array_equal(train, predict(times.astype(np.float32), np.float32(0.)))
