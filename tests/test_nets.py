"""The networks against a float64 NumPy convolution, and the frozen prefix's lack of gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax import nets


def np_conv_same(x, kernel, bias):
  """float64 'SAME' cross-correlation, NHWC x HWIO, by explicit shifts (independent of XLA)."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + h, j:j + w, :] @ kernel[i, j]
  return out + bias


def np_forward(params, x):
  h = x.astype(np.float64)
  depth = nets.depth_of(params)
  for i in range(depth - 1):
    p = params[f"convs_{i}"]
    h = np.maximum(np_conv_same(h, np.float64(p["kernel"]), np.float64(p["bias"])), 0)
  p = params["head"]
  return np_conv_same(h, np.float64(p["kernel"]), np.float64(p["bias"])) + x


@pytest.mark.parametrize("depth,kernel", [(2, 3), (4, 5)])
def test_forward_matches_numpy(depth, kernel):
  x = np.random.default_rng(0).normal(size=(2, 10, 9, 2)).astype(np.float32)
  params = nets.init(jax.random.key(1), x.shape, depth=depth, features=6, kernel_size=kernel)
  net = nets.DeepNet(features=6, kernel_size=kernel)
  out = np.asarray(nets.forward(net, params, jnp.asarray(x)))
  np.testing.assert_allclose(out, np_forward(jax.device_get(params), x), rtol=1e-4, atol=1e-5)
  assert nets.depth_of(params) == depth


def test_prefix_has_no_gradient_and_matches_hidden():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 2)), jnp.float32)
  params = nets.init(jax.random.key(0), x.shape, depth=3, features=4, kernel_size=3)
  net = nets.DeepNet(features=4, kernel_size=3)
  grads = jax.grad(lambda p: jnp.sum(nets.prefix_features(net, p, x, 2) ** 2))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
  h1 = np.asarray(nets.prefix_features(net, params, x, 1))
  p = jax.device_get(params["convs_0"])
  np.testing.assert_allclose(
      h1, np.maximum(np_conv_same(np.float64(x), p["kernel"], p["bias"]), 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(nets.prefix_features(net, params, x, 0)), np.asarray(x))


def test_stack_layer_builds_the_deep_net_layout():
  shape = (1, 8, 8, 2)
  e2e = nets.init(jax.random.key(0), shape, depth=4, features=4, kernel_size=3)
  two = nets.TwoLayer(features=4, kernel_size=3)
  params = {}
  for i in range(3):
    c_in = 2 if i == 0 else 4
    layer = two.init(jax.random.key(i), jnp.zeros(shape[:-1] + (c_in,)), jnp.zeros(shape))["params"]
    params = nets.stack_layer(params, layer, i)
    assert nets.depth_of(params) == i + 2
  assert jax.tree.structure(params) == jax.tree.structure(e2e)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, e2e)


def test_two_layer_is_a_stage_of_the_deep_net():
  """A depth-2 DeepNet is exactly the first stage's TwoLayer with the input as skip."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 2)), jnp.float32)
  two = nets.TwoLayer(features=4, kernel_size=3)
  layer = two.init(jax.random.key(3), x, x)["params"]
  deep = nets.stack_layer({}, layer, 0)
  np.testing.assert_allclose(np.asarray(two.apply({"params": layer}, x, x)),
                             np.asarray(nets.forward(nets.DeepNet(features=4, kernel_size=3),
                                                     deep, x)), rtol=1e-6, atol=1e-6)


def test_depth_below_two_is_rejected():
  with pytest.raises(ValueError, match="depth"):
    nets.init(jax.random.key(0), (1, 8, 8, 2), depth=1, features=4, kernel_size=3)
