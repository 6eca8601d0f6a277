"""MAML sinusoid tasks: shapes, parameter ranges, exact targets, reproducibility, pools."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats

from tasks import SinusoidSampler


def _assert_batches_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shapes_and_dtypes():
  batch = SinusoidSampler(k_shot=5, k_query=7).sample(0, 4)
  x, y = batch["support"]
  xq, yq = batch["query"]
  assert x.shape == y.shape == (4, 5, 1)
  assert xq.shape == yq.shape == (4, 7, 1)
  assert batch["info"]["amplitude"].shape == batch["info"]["phase"].shape == (4,)
  for leaf in jax.tree.leaves(batch):
    assert leaf.dtype == np.float32


def test_query_defaults_to_k_shot_as_in_maml():
  sampler = SinusoidSampler(k_shot=3)
  assert sampler.k_query == 3
  assert sampler.sample(0, 2)["query"][0].shape == (2, 3, 1)


def test_parameters_in_maml_ranges_and_targets_exact():
  batch = SinusoidSampler(k_shot=10, k_query=20).sample(1, 2000)
  amplitude, phase = batch["info"]["amplitude"], batch["info"]["phase"]
  # Bounds are float32-rounded: float32(pi) is slightly above pi.
  assert amplitude.min() >= np.float32(0.1) and amplitude.max() <= np.float32(5.0)
  assert phase.min() >= 0.0 and phase.max() <= np.float32(np.pi)
  for x, y in (batch["support"], batch["query"]):
    assert x.min() >= -5.0 and x.max() <= 5.0
    np.testing.assert_array_equal(y, amplitude[:, None, None] * np.sin(x - phase[:, None, None]))
  # The draws are uniform over the MAML ranges (fixed seed: deterministic).
  assert scipy.stats.kstest(amplitude, scipy.stats.uniform(0.1, 4.9).cdf).pvalue > 1e-3
  assert scipy.stats.kstest(phase, scipy.stats.uniform(0.0, np.pi).cdf).pvalue > 1e-3
  xs = batch["support"][0].ravel()
  assert scipy.stats.kstest(xs, scipy.stats.uniform(-5.0, 10.0).cdf).pvalue > 1e-3


def test_custom_ranges():
  batch = SinusoidSampler(2, amplitude_range=(1.0, 2.0), phase_range=(0.5, 0.6),
                          x_range=(0.0, 1.0)).sample(0, 100)
  assert np.all((batch["info"]["amplitude"] >= 1.0) & (batch["info"]["amplitude"] <= 2.0))
  assert np.all((batch["info"]["phase"] >= np.float32(0.5)) & (batch["info"]["phase"] <= 0.6))
  assert np.all((batch["support"][0] >= 0.0) & (batch["support"][0] <= 1.0))


def test_same_seed_same_tasks_different_seed_different_tasks():
  sampler = SinusoidSampler(4)
  _assert_batches_equal(sampler.sample(7, 3), sampler.sample(7, 3))
  _assert_batches_equal(SinusoidSampler(4).sample(7, 3), sampler.sample(7, 3))
  assert not np.array_equal(sampler.sample(7, 3)["support"][0], sampler.sample(8, 3)["support"][0])


def test_jax_keys_seed_reproducibly():
  sampler = SinusoidSampler(4)
  key_a, key_b = jax.random.split(jax.random.key(0))
  _assert_batches_equal(sampler.sample(key_a, 3), sampler.sample(key_a, 3))
  assert not np.array_equal(sampler.sample(key_a, 3)["info"]["amplitude"],
                            sampler.sample(key_b, 3)["info"]["amplitude"])
  raw = jax.random.PRNGKey(5)
  _assert_batches_equal(sampler.sample(raw, 3), sampler.sample(raw, 3))


def test_fixed_pool_only_yields_pool_tasks():
  sampler = SinusoidSampler(3, num_tasks=4, pool_seed=2)
  assert sampler.num_tasks == 4
  pool = sampler.pool_batch(np.arange(4))
  seen = set()
  for seed in range(5):
    batch = sampler.sample(seed, 16)
    for amplitude, x in zip(batch["info"]["amplitude"], batch["support"][0]):
      match = np.flatnonzero(pool["info"]["amplitude"] == amplitude)
      assert match.size == 1
      np.testing.assert_array_equal(x, pool["support"][0][match[0]])
      seen.add(int(match[0]))
  assert seen == {0, 1, 2, 3}
  # The pool depends on pool_seed only.
  _assert_batches_equal(pool, SinusoidSampler(3, num_tasks=4, pool_seed=2).pool_batch(range(4)))
  assert not np.array_equal(
      pool["info"]["phase"],
      SinusoidSampler(3, num_tasks=4, pool_seed=3).pool_batch(range(4))["info"]["phase"])


@pytest.mark.parametrize("kwargs, match", [
    ({"k_shot": 0}, "k_shot"),
    ({"k_shot": 2.5}, "k_shot"),
    ({"k_shot": 2, "k_query": 0}, "k_query"),
    ({"amplitude_range": (5.0, 0.1)}, "amplitude_range"),
    ({"phase_range": (0.0,)}, "phase_range"),
    ({"x_range": (0.0, float("inf"))}, "x_range"),
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_tasks": 3, "pool_seed": -1}, "pool_seed"),
    # A key drew the pool but `describe` could not record it: a TypeError from int().
    ({"num_tasks": 3, "pool_seed": jax.random.key(0)}, "`pool_seed` must be a non-negative int"),
    ({"num_tasks": 3, "pool_seed": jax.random.PRNGKey(0)}, "`pool_seed` must be a non-negat"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SinusoidSampler(**kwargs)


def test_bad_sample_arguments_raise():
  sampler = SinusoidSampler(2)
  with pytest.raises(ValueError, match="meta_batch_size"):
    sampler.sample(0, 0)
  with pytest.raises(ValueError, match="key_or_seed"):
    sampler.sample(-1, 2)
  with pytest.raises(ValueError, match="key_or_seed"):
    sampler.sample("0", 2)
  with pytest.raises(ValueError, match="single JAX PRNG key"):
    sampler.sample(jax.random.split(jax.random.key(0), 2), 2)
  with pytest.raises(ValueError, match="num_tasks=None"):
    sampler.pool_batch([0])
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    SinusoidSampler(2, num_tasks=2).pool_batch([2])


def test_describe_names_every_setting_that_decides_the_tasks():
  """`describe` goes into meta-learning checkpoints: equal descriptions for equal settings,
  a different one whenever the tasks would differ, and JSON-serialisable."""
  import json
  base = SinusoidSampler(5, 7, num_tasks=3, pool_seed=2).describe()
  assert base == {"type": "SinusoidSampler", "num_tasks": 3, "pool_seed": 2, "k_shot": 5,
                  "k_query": 7, "amplitude_range": [0.1, 5.0],
                  "phase_range": [0.0, float(np.pi)], "x_range": [-5.0, 5.0]}
  assert json.loads(json.dumps(base)) == base
  assert SinusoidSampler(5, 7, num_tasks=np.int64(3), pool_seed=np.int64(2)).describe() == base
  for other in (SinusoidSampler(6, 7, num_tasks=3, pool_seed=2),
                SinusoidSampler(5, 8, num_tasks=3, pool_seed=2),
                SinusoidSampler(5, 7, num_tasks=3, pool_seed=2, amplitude_range=(1., 2.)),
                SinusoidSampler(5, 7, num_tasks=3, pool_seed=2, phase_range=(0., 1.)),
                SinusoidSampler(5, 7, num_tasks=3, pool_seed=2, x_range=(-1., 1.)),
                SinusoidSampler(5, 7, num_tasks=4, pool_seed=2),
                SinusoidSampler(5, 7, num_tasks=3, pool_seed=9),
                SinusoidSampler(5, 7)):
    assert other.describe() != base
  # Without a pool the pool seed decides nothing.
  assert SinusoidSampler(5, pool_seed=1).describe() == SinusoidSampler(5, pool_seed=2).describe()
