"""The networks: the deep conv ReLU net and the two-layer net a layer-wise stage trains.

Images are channels-last float32 ``(N, *spatial, 2)`` (real, imaginary); spatial is (H, W) or
(D, H, W) (``ndim=3``). ``DeepNet(depth=L)`` parameters: ``{"convs_0" .. "convs_{L-2}", "head"}``,
each Flax ``nn.Conv`` ``{"kernel": (*k, C_in, C_out), "bias": (C_out,)}``; a layer-wise run builds
this tree stage by stage, so both methods are evaluated by the same ``DeepNet``.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def kernel_shape(kernel_size, ndim: int) -> tuple[int, ...]:
  """A kernel's spatial extent: ``k`` -> ``(k,) * ndim``; a tuple must have ``ndim`` entries."""
  if isinstance(kernel_size, int):
    return (kernel_size,) * ndim
  shape = tuple(int(k) for k in kernel_size)
  if len(shape) != ndim:
    raise ValueError(f"kernel_size {shape}: expected {ndim} extents for a {ndim}D network")
  return shape


class DeepNet(nn.Module):
  """``out = head(h_{L-1}) + x``, ``h_0 = x``, ``h_i = relu(conv_i(h_{i-1}))``; ``depth`` counts
  the 1x1 head too."""
  depth: int = 5
  features: int = 256
  kernel_size: Any = 7  # k in every spatial dimension, or one extent per dimension (3, 7, 7)
  ndim: int = 2
  out_channels: int = 2
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  def setup(self):
    if self.depth < 2:
      raise ValueError(f"depth must be >= 2 (one hidden layer and the head), got {self.depth}")
    k = kernel_shape(self.kernel_size, self.ndim)
    self.convs = [nn.Conv(self.features, k, padding="SAME", dtype=self.dtype)
                  for _ in range(self.depth - 1)]
    self.head = nn.Conv(self.out_channels, (1,) * self.ndim, dtype=self.dtype)

  def hidden(self, x, n=None):
    """Features after the first ``n`` ReLU layers (all hidden layers by default)."""
    h = x
    for conv in self.convs[: self.depth - 1 if n is None else n]:
      h = nn.relu(conv(h))
    return h

  def __call__(self, x):
    return self.head(self.hidden(x)).astype(x.dtype) + x


class TwoLayer(nn.Module):
  """A non-convex layer-wise stage: ``f(relu(g(h))) + skip`` (g: k x k conv, f: 1x1 conv)."""
  features: int = 256
  kernel_size: Any = 7  # as DeepNet's
  ndim: int = 2
  out_channels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skip):
    k = kernel_shape(self.kernel_size, self.ndim)
    z = nn.relu(nn.Conv(self.features, k, padding="SAME", dtype=self.dtype, name="conv")(h))
    return nn.Conv(self.out_channels, (1,) * self.ndim, dtype=self.dtype, name="head")(z).astype(
        skip.dtype) + skip


def depth_of(params) -> int:
  """Depth (conv layers incl. the head) of a ``DeepNet`` parameter tree."""
  return sum(1 for name in params if name.startswith("convs_")) + 1


def forward(net: DeepNet, params, x):
  """The deep network ``params`` on ``x`` (N, *spatial, 2); ``net`` gives the architecture, and
  the depth is read from ``params`` (an e2e net, or a layer-wise net after any stage)."""
  return net.clone(depth=depth_of(params)).apply({"params": params}, x)


def prefix_features(net: DeepNet, params, x, n: int):
  """``h_n`` (N, *spatial, features): the first ``n`` ReLU layers on ``x`` (``x`` for n = 0), under
  ``stop_gradient`` so XLA keeps none of the frozen prefix's activations for a backward pass."""
  if n == 0:
    return x
  h = net.clone(depth=n + 1).apply({"params": params}, x, n, method=DeepNet.hidden)
  return jax.lax.stop_gradient(h)


def stack_layer(params, layer, index):
  """The ``DeepNet`` tree of depth ``index + 2``: ``convs_0 .. convs_{index-1}`` of ``params``,
  then a stage's ``layer`` ``{"conv", "head"}`` as ``convs_{index}`` and the head."""
  out = {f"convs_{i}": params[f"convs_{i}"] for i in range(index)}
  out[f"convs_{index}"] = layer["conv"]
  out["head"] = layer["head"]
  return out


def init(rng, x_shape, *, depth, features, kernel_size, ndim=2, out_channels=2):
  """Random parameters of a ``DeepNet`` for inputs of shape ``x_shape`` (N, *spatial, C)."""
  net = DeepNet(depth=depth, features=features, kernel_size=kernel_size, ndim=ndim,
                out_channels=out_channels)
  return net.init(rng, jnp.zeros(x_shape, jnp.float32))["params"]
