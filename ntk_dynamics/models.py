"""Haiku models used by the recipes, in standard or NTK parameterization.

Standard: W ~ N(0, σ_w²/fan_in), y = xW + b. NTK: W ~ N(0, 1), y = σ_w·xW/√fan_in + σ_b·b.
Both give the same function at initialization; they differ in how gradient steps scale with
width (under NTK parameterization the kernel stays O(1) as width grows).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "tanh": jnp.tanh,
                                    "gelu": jax.nn.gelu, "erf": jax.scipy.special.erf}
PARAMETERIZATIONS = ("standard", "ntk")


def _check(parameterization: str, activation: str, sizes: dict, listed: str = "") -> None:
  """Checks the options; `sizes` maps an argument's name to a positive int (`num_blocks`
  may be 0) or, for the argument named `listed`, a sequence of them."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"`parameterization` must be one of {PARAMETERIZATIONS}, "
                     f"got {parameterization!r}.")
  if activation not in ACTIVATIONS:
    raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
  for name, value in sizes.items():
    # A zero width gives a network whose outputs are constant (silently); a string of digits
    # would be read as one layer per character.
    is_list = name == listed
    values = list(value) if is_list and not isinstance(value, (str, bytes)) else [value]
    lowest = 0 if name == "num_blocks" else 1
    if (is_list and isinstance(value, (str, bytes))) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lowest
        for v in values):
      what = "a sequence of positive ints" if is_list else (
          "an int >= 0" if lowest == 0 else "a positive int")
      raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def _check_input(model: str, x: Any, ndim: Optional[int] = None) -> None:
  """The parameters take the input's dtype, so an integer input (raw uint8 pixels) would ask
  for integer weights; convolutions need NHWC images."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"{model}: the input `x` has dtype {jnp.result_type(x)}; a floating-point "
                    "input is expected (the parameters take its dtype), e.g. "
                    "x.astype(np.float32) / 255 for uint8 pixels.")
  if ndim is not None and np.ndim(x) != ndim:
    raise ValueError(f"{model}: the input `x` has shape {np.shape(x)}; NHWC images of shape "
                     "(N, height, width, channels) are expected.")


class Dense(hk.Module):
  """Affine layer with a choice of parameterization (see module docstring)."""

  def __init__(self, width: int, parameterization: str = "standard", w_std: float = 1.0,
               b_std: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    self.width, self.param, self.w_std, self.b_std = width, parameterization, w_std, b_std

  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    if self.param == "ntk":
      w = hk.get_parameter("w", (fan_in, self.width), x.dtype, hk.initializers.RandomNormal())
      b = hk.get_parameter("b", (self.width,), x.dtype, hk.initializers.RandomNormal())
      return self.w_std * (x @ w) / float(np.sqrt(fan_in)) + self.b_std * b
    w = hk.get_parameter("w", (fan_in, self.width), x.dtype,
                         hk.initializers.RandomNormal(float(self.w_std / np.sqrt(fan_in))))
    b = hk.get_parameter("b", (self.width,), x.dtype,
                         hk.initializers.RandomNormal(self.b_std) if self.b_std
                         else jnp.zeros)
    return x @ w + b


class Conv(hk.Module):
  """3×3 SAME convolution with a choice of parameterization."""

  def __init__(self, channels: int, parameterization: str = "standard", w_std: float = 1.0,
               stride: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels, self.param, self.w_std, self.stride = channels, parameterization, w_std, stride

  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = 9 * x.shape[-1]
    shape = (3, 3, x.shape[-1], self.channels)
    scale = 1.0 if self.param == "ntk" else float(self.w_std / np.sqrt(fan_in))
    w = hk.get_parameter("w", shape, x.dtype, hk.initializers.RandomNormal(scale))
    y = jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.param == "ntk":
      y = self.w_std * y / float(np.sqrt(fan_in))
    b = hk.get_parameter("b", (self.channels,), x.dtype, jnp.zeros)
    return y + b


def mlp(widths: Sequence[int], num_outputs: int, *, activation: str = "relu",
        parameterization: str = "standard", w_std: float = float(np.sqrt(2.0)),
        b_std: float = 0.0) -> hk.Transformed:
  """Fully connected network; inputs of any shape (N, ...) are flattened.

  Returns a transform without apply rng: `apply(params, x) -> (N, num_outputs)`.
  """
  _check(parameterization, activation, {"widths": widths, "num_outputs": num_outputs},
         listed="widths")
  act = ACTIVATIONS[activation]

  def forward(x):
    _check_input("mlp", x)
    h = x.reshape(x.shape[0], -1)
    for i, w in enumerate(widths):
      h = act(Dense(w, parameterization, w_std, b_std, name=f"dense_{i}")(h))
    return Dense(num_outputs, parameterization, 1.0, b_std, name="readout")(h)

  return hk.without_apply_rng(hk.transform(forward))


def cnn(channels: Sequence[int], num_outputs: int, *, activation: str = "relu",
        parameterization: str = "standard", w_std: float = float(np.sqrt(2.0))) -> hk.Transformed:
  """3×3 convolutions on NHWC images, then global average pooling and a dense readout."""
  _check(parameterization, activation, {"channels": channels, "num_outputs": num_outputs},
         listed="channels")
  act = ACTIVATIONS[activation]

  def forward(x):
    _check_input("cnn", x, ndim=4)
    h = x
    for i, c in enumerate(channels):
      h = act(Conv(c, parameterization, w_std, name=f"conv_{i}")(h))
    h = h.mean(axis=(1, 2))
    return Dense(num_outputs, parameterization, 1.0, name="readout")(h)

  return hk.without_apply_rng(hk.transform(forward))


def resnet(channels: int, num_blocks: int, num_outputs: int, *, activation: str = "relu",
           parameterization: str = "standard", w_std: float = float(np.sqrt(2.0))) -> hk.Transformed:
  """Small pre-activation ResNet without normalization (per-example independent): a stem
  convolution, `num_blocks` residual blocks of two 3×3 convolutions, pooling, readout.
  Residual branches are scaled by 1/√2 so the forward variance stays constant with depth."""
  _check(parameterization, activation,
         {"channels": channels, "num_blocks": num_blocks, "num_outputs": num_outputs})
  act = ACTIVATIONS[activation]

  def forward(x):
    _check_input("resnet", x, ndim=4)
    h = Conv(channels, parameterization, 1.0, name="stem")(x)
    for i in range(num_blocks):
      r = Conv(channels, parameterization, w_std, name=f"block_{i}_a")(act(h))
      r = Conv(channels, parameterization, w_std, name=f"block_{i}_b")(act(r))
      h = (h + r) / float(np.sqrt(2.0))
    h = act(h).mean(axis=(1, 2))
    return Dense(num_outputs, parameterization, 1.0, name="readout")(h)

  return hk.without_apply_rng(hk.transform(forward))
