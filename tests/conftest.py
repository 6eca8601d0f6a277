"""Shared test setup: float64 everywhere; the model zoo is importable as `tests.zoo`."""
import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def fast_compile():
  """Compiles with most XLA optimizations off, for modules that build hundreds of tiny
  programs where compilation dominates (about 1.5x faster). Restored after the module."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
