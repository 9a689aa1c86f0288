"""The convex stage: objective vs an independent NumPy model, solvers, certificate, ReLU mapping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwjax import nets
from lwjax.stages import convex, gated, precond
from lwjax.stages import fista as fista_lib

K, C_IN, P, C_OUT = 3, 3, 2, 2
FEATURES = 2 * P * C_OUT


def _data(seed, n=4, size=8, c_in=C_IN):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((n, size, size, c_in)).astype(np.float32)
  skip = 0.1 * rng.standard_normal((n, size, size, C_OUT)).astype(np.float32)
  y = skip + rng.standard_normal(skip.shape).astype(np.float32)
  return h, skip, y


def _batches(h, skip, y, size):
  return lambda: ((h[i:i + size], skip[i:i + size], y[i:i + size]) for i in range(0, len(h), size))


def _random_variables(seed, c_in=C_IN, scale=0.3):
  w = scale * np.random.default_rng(seed).standard_normal((2, K, K, c_in, P, C_OUT))
  return {"v": jnp.asarray(w[0], jnp.float32), "z": jnp.asarray(w[1], jnp.float32)}


def _adam(lr, steps):
  return optax.adam(optax.exponential_decay(lr, steps, 1e-3))


@functools.partial(jax.jit, static_argnames=("st", "epochs"))
def _run(st, variables, stacked, epochs, opt=None):
  def step(carry, batch):
    grads, _ = jax.grad(st.loss, has_aux=True)(carry[0], *batch)
    updates, opt = st.tx.update(grads, carry[1], carry[0])
    return (optax.apply_updates(carry[0], updates), opt), None

  def epoch(carry, _):
    return jax.lax.scan(step, carry, stacked)[0], None
  opt = st.tx.init(variables) if opt is None else opt
  return jax.lax.scan(epoch, (variables, opt), None, length=epochs)[0]


def _fit(st, variables, h, skip, y, batch_size, epochs, recenter_every=0):
  """The trainer's loop in miniature: one ``tx.update`` per equal-size batch, then ``solution``;
  with ``recenter_every``, ``Stage.recenter`` after every that many epochs (the run's checks)."""
  stacked = tuple(jnp.asarray(a).reshape((-1, batch_size) + a.shape[1:]) for a in (h, skip, y))
  if not recenter_every:
    return st.solution(*_run(st, variables, stacked, epochs))
  opt = None
  for _ in range(epochs // recenter_every):
    variables, opt = _run(st, variables, stacked, recenter_every, opt)
    _, variables = st.recenter(variables, opt, _batches(h, skip, y, batch_size))
  return st.solution(variables, opt)


# ----------------------------------------------------------------------------------------------
# An independent float64 NumPy model: explicit patches and dense operators.

def _patches(h, k=K):
  """(N, H, W, k*k*C) patches of a SAME, stride-1 k x k window, ordered (ki, kj, c) like HWIO."""
  n, hh, ww, c = h.shape
  pad = np.pad(np.asarray(h, np.float64), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = np.empty((n, hh, ww, k, k, c))
  for i in range(k):
    for j in range(k):
      out[:, :, :, i, j] = pad[:, i:i + hh, j:j + ww]
  return out.reshape(n, hh, ww, k * k * c)


def _np_objective(v, z, h, skip, y, u, beta, rho):
  """Objective and its gradient wrt (V, Z) in float64, by patches and explicit sums."""
  x = _patches(h)
  d = (x @ np.asarray(u, np.float64).reshape(x.shape[-1], -1) >= 0).astype(np.float64)
  w = np.stack([np.asarray(v, np.float64), np.asarray(z, np.float64)])  # (2, k, k, C, P, O)
  wf = w.reshape(2, x.shape[-1], P, C_OUT)
  out = np.einsum("nija,sapc->nijspc", x, wf)
  pred = skip + np.einsum("nijp,nijpc->nijc", d, out[..., 0, :, :] - out[..., 1, :, :])
  e = pred - y
  m, pixels = e.size, e.size // C_OUT
  sign = 2 * d - 1
  viol = np.maximum(-sign[..., None, :, None] * out, 0)
  norms = np.sqrt(np.sum(wf ** 2, axis=1))
  value = 0.5 * np.sum(e ** 2) / m + beta * norms.sum() + rho * viol.sum() / pixels
  g_data = np.einsum("nija,nijp,nijc,s->sapc", x, d, e, np.array([1.0, -1.0])) / m
  g_pen = rho * np.einsum("nija,nijspc->sapc", x, (viol > 0) * -sign[..., None, :, None]) / pixels
  unit = np.divide(wf, norms[:, None], out=np.zeros_like(wf), where=norms[:, None] > 0)
  grad = (g_data + g_pen + beta * unit).reshape(w.shape)  # 0: a subgradient at a zero group
  return value, grad


def _dense(h, u):
  """The gated conv operator A as a dense (N*H*W*C_OUT, 2*k*k*C*P*C_OUT) matrix."""
  x = _patches(h)
  d = (x @ np.asarray(u, np.float64).reshape(x.shape[-1], -1) >= 0).astype(np.float64)
  a = np.einsum("nija,nijp,co->nijoapc", x, d, np.eye(C_OUT)).reshape(-1, x.shape[-1] * P * C_OUT)
  return np.concatenate([a, -a], axis=1)


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_objective_and_gradient_match_numpy(rho):
  h, skip, y = _data(0)
  variables = _random_variables(1)
  u = gated.gate_filters(3, K, 2, C_IN, P)
  fn = lambda w: gated.objective(w, h, skip, y, u, beta=0.05, rho=rho)
  (value, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(variables)
  ref_value, ref_grad = _np_objective(variables["v"], variables["z"], h, skip, y, u, 0.05, rho)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad["v"], ref_grad[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad["z"], ref_grad[1], rtol=1e-4, atol=1e-6)
  pred = gated.predict(variables, h, skip, u)
  np.testing.assert_allclose(aux["mse"], np.mean((pred - y) ** 2), rtol=1e-5)


def test_zero_groups_have_finite_gradients():
  h, skip, y = _data(0)
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=0.05, rho=1.0,
                           tx=optax.adam(1e-2))
  grad = jax.jit(jax.grad(lambda w: st.loss(w, h, skip, y)[0]))(st.init(None, h.shape))
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grad))


def test_duality_gap_matches_dense_primal_and_dual():
  """The certificate's gap is P(w) - D(theta) at DESIGN.md's dual point, in dense float64 form;
  finalize weights its ragged last batch by size."""
  h, skip, y = _data(1)
  u = gated.gate_filters(0, K, 2, C_IN, P)
  beta = 0.02
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=beta, rho=0.0,
                           tx=optax.adam(1e-2))
  variables = _random_variables(2, scale=0.05)
  _, report = st.finalize(variables, _batches(h, skip, y, 3))

  a = _dense(h, u)
  w = np.concatenate([np.asarray(variables[k], np.float64).reshape(-1) for k in ("v", "z")])
  r = (np.asarray(y, np.float64) - skip).reshape(-1) / np.sqrt(a.shape[0])
  a = a / np.sqrt(a.shape[0])
  e = r - a @ w
  group_norm = lambda g: np.sqrt((g.reshape(2, -1, P * C_OUT) ** 2).sum(1))
  theta = e * min(1.0, beta / group_norm(a.T @ e).max())
  assert group_norm(a.T @ theta).max() <= beta * (1 + 1e-9)  # dual feasible
  primal = 0.5 * e @ e + beta * group_norm(w).sum()
  dual = 0.5 * r @ r - 0.5 * (r - theta) @ (r - theta)
  np.testing.assert_allclose(report["objective"], primal, rtol=1e-5)
  np.testing.assert_allclose(report["mse"], e @ e, rtol=1e-5)  # e is scaled by 1/sqrt(M)
  np.testing.assert_allclose(report["rel_gap"], (primal - dual) / primal, rtol=1e-4)
  np.testing.assert_allclose(report["beta_max"], group_norm(a.T @ r).max(), rtol=1e-5)
  assert report["rel_gap"] > 0.01  # A random point is far from optimal.


def test_lipschitz_is_the_dense_operator_norm():
  h, skip, y = _data(2)
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=0.01, rho=0.0, solver="fista",
                           fista_iters=10)
  st, report = st.prepare(_batches(h, skip, y, 2), h.shape)
  a = _dense(h, gated.gate_filters(0, K, 2, C_IN, P))
  exact = np.linalg.eigvalsh(a.T @ a / a.shape[0]).max()
  # The power iteration approaches L from below; FISTA's 1.1 margin must cover the rest.
  assert exact / 1.1 < report["lipschitz"] <= exact * (1 + 1e-5)
  assert st.epochs == 10


# ----------------------------------------------------------------------------------------------
# Solvers: convexity made visible.

def test_fista_adam_inits_and_batch_sizes_reach_one_objective():
  h, skip, y = _data(3, n=8)
  batches = _batches(h, skip, y, 4)
  kwargs = dict(features=FEATURES, kernel_size=K, beta=0.02, rho=0.0)
  fista = convex.convex_stage(**kwargs, solver="fista", fista_iters=200, steps_per_epoch=2)
  fista, _ = fista.prepare(batches, h.shape)
  zeros = fista.init(None, h.shape)
  _, ref = fista.finalize(_fit(fista, zeros, h, skip, y, 4, 200), batches)
  print(f"FISTA: objective {ref['objective']:.6g}, relative duality gap {ref['rel_gap']:.2e}")
  assert ref["rel_gap"] < 1e-6 and ref["kkt_violation"] < 1e-3

  adam = convex.convex_stage(**kwargs, tx=_adam(1e-2, 1000))
  runs = {"zeros, batch 8": (zeros, 8, 1000),
          "random, batch 8": (_random_variables(4, scale=0.05), 8, 1000),
          "zeros, batch 2": (zeros, 2, 250)}
  for name, (init, batch_size, epochs) in runs.items():
    _, report = adam.finalize(_fit(adam, init, h, skip, y, batch_size, epochs), batches)
    print(f"Adam {name}: objective {report['objective']:.6g}, gap {report['rel_gap']:.2e}")
    assert abs(report["objective"] / ref["objective"] - 1) < 1e-3, name
    assert report["rel_gap"] < 1e-3, name


def test_fista_iterate_lives_in_the_optimizer_state():
  h, skip, y = _data(4)
  kwargs = dict(features=FEATURES, kernel_size=K, rho=0.0, solver="fista", fista_iters=1,
                steps_per_epoch=2)
  variables = convex.convex_stage(beta=1.0, **kwargs).init(None, h.shape)
  grads = jax.jit(jax.grad(lambda w: gated.objective(
      w, h, skip, y, gated.gate_filters(0, K, 2, C_IN, P), beta=0.0, rho=0.0)[0]))(variables)
  beta = float(np.median(gated.group_norms(grads)))  # some groups leave zero, some stay
  st = convex.convex_stage(beta=beta, **kwargs)
  with pytest.raises(RuntimeError, match="prepare"):
    st.tx.init(variables)
  st, report = st.prepare(_batches(h, skip, y, 2), h.shape)
  # The trainer donates params and optimizer state together: they must share no buffer.
  buffers = lambda tree: {a.unsafe_buffer_pointer() for a in jax.tree.leaves(tree)}
  assert not buffers(variables) & buffers(st.tx.init(variables))
  x = _fit(st, variables, h, skip, y, 2, 1)
  # One iteration from zero on the accumulated full-batch gradient is one prox step.
  step = 1 / (1.1 * report["lipschitz"])
  expected = fista_lib.group_shrink(jax.tree.map(lambda g: -step * g, grads), step * beta)
  for k in ("v", "z"):
    np.testing.assert_allclose(x[k], expected[k], rtol=1e-5, atol=1e-8)
  norms = np.asarray(gated.group_norms(x))
  assert (norms == 0).any() and (norms > 0).any()


def test_relative_beta_is_a_fraction_of_beta_max():
  """beta_max zeroes every group: one FISTA step from zero keeps exactly the groups whose
  gradient norm exceeds beta, so at 0.99 * beta_max only the top (p, c) moves (its V and Z
  groups, whose gradients are opposite) and at 1.01 * beta_max nothing does."""
  h, skip, y = _data(4)
  kwargs = dict(features=FEATURES, kernel_size=K, rho=0.0, relative_beta=True)
  adam = convex.convex_stage(beta=0.5, tx=optax.adam(1e-3), **kwargs)
  assert adam.prepare is not None  # beta is only known after a pass over the data ...
  adam.tx.init(adam.init(None, h.shape))  # ... but Adam's state is (memory analysis needs it).
  adam, report = adam.prepare(_batches(h, skip, y, 2), h.shape)
  assert report["beta"] == pytest.approx(0.5 * report["beta_max"])
  _, final = adam.finalize(adam.init(None, h.shape), _batches(h, skip, y, 4))
  assert final["beta_max"] == pytest.approx(report["beta_max"], rel=1e-5)
  for fraction, moving in ((0.99, 2), (1.01, 0)):
    st = convex.convex_stage(beta=fraction, solver="fista", fista_iters=1, **kwargs)
    st, _ = st.prepare(_batches(h, skip, y, 4), h.shape)
    x = _fit(st, st.init(None, h.shape), h, skip, y, 4, 1)
    assert np.sum(np.asarray(gated.group_norms(x)) > 0) == moving


@pytest.mark.parametrize("solver", ["adam", "fista", "pfista"])
def test_a_stage_on_zero_features_is_refused(solver):
  # An empty previous layer (every group pruned) feeds zeros: beta_max = 0 would make beta 0
  # and the certificate NaN, and FISTA's power iteration would divide by zero.
  h, skip, y = _data(4)
  st = convex.convex_stage(beta=0.5, features=FEATURES, kernel_size=K, rho=0.0,
                           relative_beta=solver == "adam", solver=solver,
                           tx=optax.adam(1e-3) if solver == "adam" else None)
  with pytest.raises(ValueError, match="zero everywhere"):
    st.prepare(_batches(jnp.zeros_like(h), skip, y, 2), h.shape)


def test_planted_relu_net_is_recovered():
  """y = skip + a ReLU net whose hidden units follow the gates (a solution in the model class)."""
  h, skip, _ = _data(5)
  u = gated.gate_filters(0, K, 2, C_IN, P)
  a = np.random.default_rng(0).uniform(0.5, 1.5, (P, C_OUT)).astype(np.float32)
  planted = {"v": u[..., None] * a, "z": jnp.zeros((K, K, C_IN, P, C_OUT))}  # on the ReLU cones
  y = np.asarray(gated.predict(planted, h, skip, u))
  batches = _batches(h, skip, y, 4)
  signal = np.mean((y - skip) ** 2)

  # rho = 0: the gap closes (to float32 accuracy). From zero the gated program splits each neuron
  # evenly between V_pc and -Z_pc (it cannot tell them apart), so the +-1 head maps it to a
  # linear unit; the refit head on relu(+-conv(h, U_p)) recovers the target.
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=1e-3, rho=0.0, solver="fista",
                           fista_iters=300, refit_head=True)
  st, _ = st.prepare(batches, h.shape)
  _, report = st.finalize(_fit(st, st.init(None, h.shape), h, skip, y, 4, 300), batches)
  print(f"planted, rho = 0: gap {report['rel_gap']:.2e}, relative mse {report['mse'] / signal:.2e}"
        f", refit ReLU net {report['mse_refit'] / signal:.2e}")
  assert report["rel_gap"] < 1e-3
  assert report["mse"] / signal < 1e-5 and report["mse_refit"] / signal < 1e-5

  # rho > 0 picks the split on the cones: the +-1 mapped ReLU net itself fits the target.
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=1e-3, rho=1.0,
                           tx=_adam(3e-2, 1000))
  _, report = st.finalize(_fit(st, st.init(None, h.shape), h, skip, y, 4, 1000), batches)
  print(f"planted, rho = 1: ReLU net relative mse {report['mse_relu'] / signal:.2e}, "
        f"mismatch {report['relu_mismatch']:.2e}")
  assert report["mse_relu"] / signal < 1e-3 and report["relu_mismatch"] < 1e-2


# ----------------------------------------------------------------------------------------------
# Back to a ReLU layer.

def _on_cone(seed, c_in):
  """V_pc = a_pc U_p, Z_pc = b_pc U_p (a, b > 0): every cone constraint holds by construction."""
  a, b = np.random.default_rng(seed).uniform(0.2, 1.0, (2, P, C_OUT)).astype(np.float32)
  u = gated.gate_filters(0, K, 2, c_in, P)[..., None]
  return {"v": jnp.asarray(u * a), "z": jnp.asarray(u * b)}


def test_mapped_relu_net_reproduces_the_convex_prediction_on_the_cone():
  x, _, y = _data(6, c_in=2)
  net = nets.DeepNet(features=FEATURES, kernel_size=K)
  forward = jax.jit(nets.forward, static_argnums=0)
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=0.01, rho=1.0,
                           tx=optax.adam(1e-3))

  # Stage 1: h = skip = x.
  variables = _on_cone(0, c_in=2)
  params = nets.stack_layer({}, st.to_layer(variables), 0)
  assert params["convs_0"]["kernel"].shape == (K, K, 2, FEATURES)
  u = gated.gate_filters(0, K, 2, 2, P)
  np.testing.assert_allclose(forward(net, params, x), gated.predict(variables, x, x, u),
                             rtol=1e-5, atol=1e-5)
  _, report = st.finalize(variables, _batches(x, x, y, 4))
  assert report["relu_mismatch"] < 1e-5 and report["constraint_violation"] < 1e-6
  assert report["mse_relu"] == pytest.approx(report["mse"], rel=1e-5)

  # Stage 2 on the frozen prefix h_1 = relu(conv_0(x)).
  h = nets.prefix_features(net, params, x, 1)
  variables = _on_cone(1, c_in=FEATURES)
  deep = nets.stack_layer(params, st.to_layer(variables), 1)
  u = gated.gate_filters(0, K, 2, FEATURES, P)
  np.testing.assert_allclose(forward(net, deep, x), gated.predict(variables, h, x, u),
                             rtol=1e-5, atol=1e-5)

  # Off the cones the two differ, and the report says so.
  _, report = st.finalize(_random_variables(7, c_in=2), _batches(x, x, y, 4))
  assert report["relu_mismatch"] > 0.1 and report["constraint_violation"] > 0.1


def test_penalty_and_refit():
  """rho > 0 moves the solution onto the cones; the refit head fits the ReLU features at least
  as well as the +-1 head, and to_layer (so the deep net) then uses it."""
  x, _, y = _data(8, n=8, c_in=2)
  batches = _batches(x, x, y, 4)
  net = nets.DeepNet(features=FEATURES, kernel_size=K)
  reports = {}
  for rho in (0.0, 5.0):
    st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=0.01, rho=rho, refit_head=True,
                             tx=_adam(1e-2, 1000))
    variables, reports[rho] = st.finalize(_fit(st, st.init(None, x.shape), x, x, y, 8, 1000),
                                          batches)
    assert reports[rho]["mse_refit"] <= reports[rho]["mse_relu"] * (1 + 1e-5)
    pred = nets.forward(net, nets.stack_layer({}, st.to_layer(variables), 0), x)
    assert np.mean((pred - y) ** 2) == pytest.approx(reports[rho]["mse_refit"], rel=1e-4)
  assert reports[5.0]["constraint_violation"] < 0.1 * reports[0.0]["constraint_violation"]
  assert reports[5.0]["relu_mismatch"] < 0.1 * reports[0.0]["relu_mismatch"]
  assert "rel_gap" in reports[0.0] and "rel_gap" not in reports[5.0]


# ----------------------------------------------------------------------------------------------
# 3D and errors.

def test_3d_matches_2d_on_a_single_slice():
  h, skip, y = _data(9)
  v2 = _random_variables(10)
  # A 3x3x3 kernel on a depth-1 volume (SAME padding) sees only its middle slice.
  v3 = {k: jnp.stack([jnp.zeros_like(w), w, jnp.zeros_like(w)]) for k, w in v2.items()}
  u3 = gated.gate_filters(0, K, 3, C_IN, P)
  two = gated.objective(v2, h, skip, y, u3[1], beta=0.1, rho=0.3)[0]
  three = gated.objective(v3, h[:, None], skip[:, None], y[:, None], u3, beta=0.1, rho=0.3)[0]
  np.testing.assert_allclose(three, two, rtol=1e-6)

  # The 3D stage end to end on a (2, 4, 8, 8) volume: gradient, report, ReLU layer, deep net.
  vol = tuple(np.repeat(a[:2, None], 4, axis=1) for a in (h, skip, y))
  st = convex.convex_stage(features=FEATURES, kernel_size=K, ndim=3, beta=0.01, rho=1.0,
                           refit_head=True, tx=optax.adam(1e-3))
  grad = jax.jit(jax.grad(lambda w: st.loss(w, *vol)[0]))(st.init(None, vol[0].shape))
  assert grad["v"].shape == (K, K, K, C_IN, P, C_OUT) and np.isfinite(grad["v"]).all()
  variables, report = st.finalize(v3, _batches(*vol, 2))
  assert report["mse_refit"] <= report["mse_relu"]
  layer = st.to_layer(variables)
  assert layer["conv"]["kernel"].shape == (K, K, K, C_IN, FEATURES)
  assert layer["head"]["kernel"].shape == (1, 1, 1, FEATURES, C_OUT)
  # As stage 1 of a 3D DeepNet (h = skip = x, 2 channels), nets.forward runs the same layer.
  x = vol[1]
  w = 0.3 * np.random.default_rng(11).standard_normal((2, K, K, K, 2, P, C_OUT))
  layer = st.to_layer({"v": jnp.asarray(w[0], jnp.float32), "z": jnp.asarray(w[1], jnp.float32)})
  net = nets.DeepNet(features=FEATURES, kernel_size=K, ndim=3)
  np.testing.assert_allclose(nets.forward(net, nets.stack_layer({}, layer, 0), x),
                             gated.relu_predict(layer, x, x), rtol=1e-5, atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="divisible"):
    convex.convex_stage(features=10, kernel_size=K, beta=0.1, rho=0.0, tx=optax.adam(1e-3))
  with pytest.raises(ValueError, match="rho"):
    convex.convex_stage(features=8, kernel_size=K, beta=0.1, rho=1.0, solver="fista")
  with pytest.raises(ValueError, match="tx"):
    convex.convex_stage(features=8, kernel_size=K, beta=0.1, rho=0.0)


def test_bfloat16_conv_is_a_bfloat16_convolution_close_to_float32():
  # The compute-dtype conv must be a plain bf16 convolution (bf16 in and out, widened after):
  # one asked for a float32 result is not a cuDNN bf16 kernel on GPUs.
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  hlo = jax.jit(lambda h, w: gated.conv(h, w, jnp.bfloat16)).lower(h, w).as_text()
  conv_lines = [line for line in hlo.splitlines() if "convolution" in line]
  assert conv_lines and all("xbf16>" in line.split("->")[-1] for line in conv_lines), conv_lines
  out = gated.conv(h, w, jnp.bfloat16)
  ref = np.asarray(gated.conv(h, w, jnp.float32), np.float64)
  assert out.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-2


@pytest.mark.parametrize("precision", [None, "highest"])
def test_the_step_and_its_gradient_run_at_the_stage_precision(precision):
  # --convex_precision (TF32 on a GPU by default rounds the step's gradient, BUILD_NOTES) must
  # reach every conv of the gradient, the transposed ones included, and only those of this stage.
  st = convex.convex_stage(features=FEATURES, kernel_size=K, beta=1e-3, rho=0.0, solver="pfista",
                           precision=precision)
  h, skip, y = _data(0, c_in=P * C_OUT + 1)  # wider than t: the CPU's filter gradient by example
  zero = jnp.zeros((K, K, P * C_OUT + 1, P, C_OUT), jnp.float32)
  w = {"w": zero, "ref": {"w": zero, "grad": zero, "value": jnp.zeros([])}}
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: st.loss(w, h, skip, y)[0]))(w)
  convs = [e.params["precision"] for e in _equations(jaxpr.jaxpr)
           if e.primitive.name == "conv_general_dilated"]
  want = None if precision is None else (jax.lax.Precision.HIGHEST,) * 2
  # Gates, forward; backward: h's cotangent (dropped by XLA in a step) and the filter gradient's
  # two platform branches (CPU, others).
  assert len(convs) == 5 and all(p == want for p in convs), convs
  if precision is None:  # no precision of its own: the stage keeps the caller's
    with jax.default_matmul_precision("highest"):
      jaxpr = jax.make_jaxpr(jax.grad(lambda w: st.loss(w, h, skip, y)[0]))(w)
    convs = [e.params["precision"] for e in _equations(jaxpr.jaxpr)
             if e.primitive.name == "conv_general_dilated"]
    assert convs == [(jax.lax.Precision.HIGHEST,) * 2] * 5, convs


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters (scan, cond)."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_anisotropic_3d_stage_uses_one_set_of_gates_everywhere():
  # With a 1 x K x K kernel the loss, beta_max, FISTA and the certificate must all gate with the
  # same (1, K, K) filters: a 1 x K x K stage on a depth-1 volume is the 2D stage.
  h, skip, y = _data(9)
  v2 = _random_variables(10)
  v3 = {k: w[None] for k, w in v2.items()}  # (1, K, K, C_in, P, C_out)
  u3 = gated.gate_filters(0, (1, K, K), 3, C_IN, P)
  st2 = convex.convex_stage(features=FEATURES, kernel_size=K, ndim=2, beta=0.01, rho=0.0,
                            refit_head=True, tx=optax.adam(1e-3))
  st3 = convex.convex_stage(features=FEATURES, kernel_size=(1, K, K), ndim=3, beta=0.01,
                            rho=0.0, refit_head=True, tx=optax.adam(1e-3))
  np.testing.assert_array_equal(st3.loss.__self__.filters(C_IN), u3)  # the stage's Program
  # Same seed and element count: the 2D gates are the 3D ones without the depth axis.
  np.testing.assert_array_equal(u3[0], gated.gate_filters(0, K, 2, C_IN, P))
  vol = tuple(a[:, None] for a in (h, skip, y))
  np.testing.assert_allclose(st3.loss(v3, *vol)[0], st2.loss(v2, h, skip, y)[0], rtol=1e-5)
  _, rep2 = st2.finalize(v2, _batches(h, skip, y, 3))
  _, rep3 = st3.finalize(v3, _batches(*vol, 3))
  for key in ("mse", "beta_max", "rel_gap", "mse_refit"):
    np.testing.assert_allclose(rep3[key], rep2[key], rtol=1e-4, err_msg=key)


# ----------------------------------------------------------------------------------------------
# The preconditioned solver (pfista): FISTA in the metric of the patch covariance.

def _smooth_data(seed, n=8, size=12):
  """Stage inputs as smooth as images (box-blurred noise): an ill-conditioned patch covariance."""
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((n, size + 4, size + 4, C_IN))
  for _ in range(3):
    h = (h[:, :-1, :-1] + h[:, 1:, :-1] + h[:, :-1, 1:] + h[:, 1:, 1:]) / 4
  h = (h[:, :size, :size] + 0.01 * rng.standard_normal((n, size, size, C_IN))).astype(np.float32)
  skip = 0.1 * rng.standard_normal((n, size, size, C_OUT)).astype(np.float32)
  return h, skip, (skip + rng.standard_normal(skip.shape)).astype(np.float32)


def test_patch_covariance_is_the_dense_patches_gram():
  h, skip, y = _data(12, n=5, size=6)
  x = _patches(h).reshape(-1, K * K * C_IN)
  s, rows = precond.patch_covariance(_batches(h, skip, y, 2), (K, K), rows_per_example=10**9,
                                     seed=0)
  assert rows == len(x)
  np.testing.assert_allclose(s, x.T @ x / len(x), rtol=1e-5, atol=1e-6)
  # A subsample: the patches at the drawn pixels, the same whatever the batch size.
  sub, sub_rows = precond.patch_covariance(_batches(h, skip, y, 3), (K, K), rows_per_example=7,
                                           seed=3)
  picks = np.concatenate([i * 36 + precond.patch_rows(36, 7, i, 3) for i in range(5)])
  assert sub_rows == 35
  np.testing.assert_allclose(sub, x[picks].T @ x[picks] / 35, rtol=1e-5, atol=1e-6)


def test_metric_prox_minimises_its_objective_in_float64():
  scipy_optimize = pytest.importorskip("scipy.optimize")
  rng = np.random.default_rng(0)
  d, groups, beta = 6, 5, 0.3
  a = np.exp(rng.uniform(-4, 2, d))  # a metric spanning a condition number of ~400
  z = rng.standard_normal((d, groups)) * np.array([0.02, 0.5, 1.0, 3.0, 10.0])
  u = np.asarray(precond.metric_prox(jnp.asarray(z, jnp.float32), jnp.asarray(a, jnp.float32),
                                     beta), np.float64)
  objective = lambda v, g: 0.5 * np.sum(a * (v - z[:, g]) ** 2) + beta * np.linalg.norm(v)
  for g in range(groups):
    if np.linalg.norm(a * z[:, g]) <= beta:  # zero is optimal: 0 is in the subdifferential
      assert np.all(u[:, g] == 0), g
      continue
    best = scipy_optimize.minimize(objective, z[:, g], args=(g,), method="Nelder-Mead",
                                   options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 40000})
    assert objective(u[:, g], g) <= best.fun + 1e-6 * abs(best.fun), g
    np.testing.assert_allclose(u[:, g], best.x, rtol=1e-3, atol=1e-5, err_msg=str(g))
    # KKT: a (u - z) + beta u / |u| = 0.
    np.testing.assert_allclose(a * (u[:, g] - z[:, g]), -beta * u[:, g] / np.linalg.norm(u[:, g]),
                               atol=1e-4 * np.abs(a * z[:, g]).max())
  assert (u == 0).all(axis=0).any() and (u != 0).any(axis=0).any()  # both cases were met


def _dense_metric(scale, coupling, num, groups):
  """``diag(scale) (x) (I_P + coupling 1 1^T)`` as a dense matrix on W (d, G) flattened row-major
  (column ``p * C_out + c``), float64."""
  channels = groups // num
  coupled = np.kron(np.eye(num) + coupling * np.ones((num, num)), np.eye(channels))
  return np.kron(np.diag(scale), coupled)


def test_metric_solve_and_dot_are_the_dense_metric():
  rng = np.random.default_rng(3)
  d, num, channels, coupling = 5, 4, 2, 1.0
  scale = np.exp(rng.uniform(-3, 2, d))
  v, w = rng.standard_normal((2, d, num * channels))
  h = _dense_metric(scale, coupling, num, num * channels)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  assert float(precond.metric_dot(f32(v), f32(w), f32(scale), coupling, num)) == pytest.approx(
      v.reshape(-1) @ h @ w.reshape(-1), rel=1e-5)
  solved = precond.metric_solve(f32((h @ v.reshape(-1)).reshape(v.shape)), f32(scale), coupling,
                                num)
  np.testing.assert_allclose(solved, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.3, 3.0])
def test_coupled_prox_minimises_its_objective_in_float64(beta):
  """``coupled_prox`` against the KKT conditions of its objective and scipy's minimisation, with
  some groups zero (beta = 3) and all active (beta = 0.3)."""
  scipy_optimize = pytest.importorskip("scipy.optimize")
  rng = np.random.default_rng(1)
  d, num, channels, coupling = 4, 3, 2, 1.0
  groups = num * channels
  a = np.exp(rng.uniform(-2, 2, d))
  z = rng.standard_normal((d, groups)) * np.array([0.3, 1.0, 3.0, 0.5, 2.0, 6.0])
  h = _dense_metric(a, coupling, num, groups)
  objective = lambda v: (0.5 * (v - z.reshape(-1)) @ h @ (v - z.reshape(-1))  # noqa: E731
                         + beta * np.linalg.norm(v.reshape(d, groups), axis=0).sum())
  u, _ = precond.coupled_prox(jnp.asarray(z, jnp.float32), jnp.asarray(a, jnp.float32), beta,
                              coupling, num, jnp.zeros((d, channels), jnp.float32))
  u = np.asarray(u, np.float64)
  # KKT: H (z - u) is beta * u_g / |u_g| on an active group, inside the beta-ball on a zero one.
  q = (h @ (z - u).reshape(-1)).reshape(d, groups)
  norms = np.linalg.norm(u, axis=0)
  for g in range(groups):
    if norms[g] > 0:
      np.testing.assert_allclose(q[:, g], beta * u[:, g] / norms[g], atol=1e-4 * beta)
    else:
      assert np.linalg.norm(q[:, g]) <= beta * (1 + 1e-5), g
  assert (norms == 0).any() == (beta == 3.0) and (norms > 0).any()
  best = min((scipy_optimize.minimize(objective, start, method="Powell",
                                      options={"xtol": 1e-10, "ftol": 1e-14, "maxfev": 400000})
              for start in (z.reshape(-1), u.reshape(-1))), key=lambda r: r.fun)
  assert objective(u.reshape(-1)) <= best.fun + 1e-6 * abs(best.fun)


def test_whitened_gate_filters_keep_their_gram_in_the_covariance():
  """``whiten(u) = S^-1/2 u``: ``whiten(u)^T S whiten(u) = u^T u`` for a covariance S."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((50, 2 * 2 * 3)) @ rng.standard_normal((12, 12))
  s = x.T @ x / 50
  q, lam = precond.factorise(s, 1e-9)
  u = gated.gate_filters(5, 2, 2, 3, 4)
  white = np.asarray(gated.whiten(u, q, lam), np.float64).reshape(12, 4)
  flat = u.reshape(12, 4).astype(np.float64)
  np.testing.assert_allclose(white.T @ s @ white, flat.T @ flat, rtol=1e-5, atol=1e-5)


def test_a_white_gated_stage_gates_with_its_whitened_filters():
  """``prepare`` whitens the seeded filters by the stage input's covariance; the loss and the
  certificate then use them (against the NumPy model with those filters)."""
  h, skip, y = _smooth_data(5)
  batches = _batches(h, skip, y, 4)
  st, _ = _pfista(beta=0.01, gates="white", coupling=1.0, steps_per_epoch=2).prepare(batches,
                                                                                    h.shape)
  u = st.loss.__self__.filters(C_IN)
  s, _ = precond.patch_covariance(batches, (K, K), rows_per_example=h[0, ..., 0].size, seed=0)
  np.testing.assert_allclose(u, gated.whiten(gated.gate_filters(0, K, 2, C_IN, P),
                                             *precond.factorise(s, 1e-6)), rtol=1e-4, atol=1e-5)
  w = _random_variables(6)["v"]
  ref_value, _ = _np_objective(w, np.zeros_like(w), h, skip, y, u, beta=0.0, rho=0.0)
  start = st.init(None, h.shape)["ref"]
  np.testing.assert_allclose(st.loss({"w": w, "ref": start}, h, skip, y)[0], ref_value, rtol=1e-5)
  cert = st.certificate({"v": w, "z": jnp.zeros_like(w)}, batches)
  np.testing.assert_allclose(cert["mse"], 2 * ref_value, rtol=1e-5)


def _pfista(**kwargs):
  return convex.convex_stage(features=FEATURES, kernel_size=K, rho=0.0, solver="pfista",
                             metric_samples=0, **kwargs)


def test_pfista_loss_and_its_gradient_match_numpy():
  """pfista's smooth part in W = V - Z and its gradient against the float64 model with Z = 0,
  about its first reference point (W = 0, from ``prepare``) and about another one."""
  h, skip, y = _data(14)
  w, w_ref = _random_variables(15)["v"], _random_variables(16)["v"]
  u = gated.gate_filters(0, K, 2, C_IN, P)
  st, _ = _pfista(beta=0.01).prepare(_batches(h, skip, y, 2), h.shape)
  data_ref, grad_ref = _np_objective(w_ref, np.zeros_like(w_ref), h, skip, y, u, beta=0.0, rho=0.0)
  expected_value, expected_grad = _np_objective(w, np.zeros_like(w), h, skip, y, u, beta=0.0,
                                                rho=0.0)
  for ref in (st.init(None, h.shape)["ref"], {"w": w_ref, "grad": grad_ref[0], "value": data_ref}):
    ref = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref)
    value, grad = jax.value_and_grad(lambda w: st.loss({"w": w, "ref": ref}, h, skip, y)[0])(w)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel_shape", [(3, 3), (4, 3), (1, 3, 3), (2, 3, 4)])
def test_filter_gradient_matches_numpy(kernel_shape):
  """Both platforms' filter gradients (CPU: by example; others: batched) against float64
  NumPy, odd and even kernels, 2D and 3D; and ``conv``'s custom gradient against autodiff."""
  ndim = len(kernel_shape)
  rng = np.random.default_rng(len(kernel_shape) + sum(kernel_shape))
  spatial = (5, 7, 6)[3 - ndim:]
  # SAME padding: tap k of the kernel reads the input at x + k - (K - 1) // 2.
  lo = [(k - 1) // 2 for k in kernel_shape]
  for c_h, c_t in ((2, 4), (4, 2)):  # on the CPU: batched, by example
    h = rng.standard_normal((3,) + spatial + (c_h,))
    t = rng.standard_normal((3,) + spatial + (c_t,))
    hp = np.pad(h, [(0, 0)] + [(a, k - 1 - a) for a, k in zip(lo, kernel_shape)] + [(0, 0)])
    ref = np.zeros(kernel_shape + (c_h, c_t))
    for k in np.ndindex(*kernel_shape):
      window = hp[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(k, spatial))]
      ref[k] = window.reshape(-1, c_h).T @ t.reshape(-1, c_t)
    h32, t32 = jnp.asarray(h, jnp.float32), jnp.asarray(t, jnp.float32)
    for fn in (gated._filter_gradient_by_example, gated._filter_gradient_batched):
      np.testing.assert_allclose(fn(kernel_shape, h32, t32), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gated.filter_gradient(h32, t32, kernel_shape), ref, rtol=1e-5,
                               atol=1e-5)
  # conv's custom gradient in both arguments against autodiff of the same forward.
  for c_h, c_out in ((2, 4), (4, 2)):
    h32 = jnp.asarray(rng.standard_normal((3,) + spatial + (c_h,)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(kernel_shape + (c_h, c_out)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3,) + spatial + (c_out,)), jnp.float32)
    ours = jax.vjp(gated.conv, h32, k)[1](g)
    plain = jax.vjp(lambda h, k: gated._conv_value(jnp.float32, h, k), h32, k)[1](g)
    for a, b in zip(ours, plain):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gates,coupling", [("gaussian", 0.0), ("white", 1.0)])
def test_pfista_certifies_where_plain_fista_has_not(gates, coupling):
  """On an ill-conditioned program, 60 passes in the metric close the gap to 1e-6; plain FISTA,
  given the same 60 passes, is still orders of magnitude away."""
  h, skip, y = _smooth_data(0)
  batches = _batches(h, skip, y, 4)
  gaps = {}
  for solver in ("pfista", "fista"):
    st = convex.convex_stage(features=FEATURES, kernel_size=K, rho=0.0, beta=0.01,
                             relative_beta=True, solver=solver, fista_iters=60,
                             steps_per_epoch=2, metric_samples=0, gates=gates,
                             coupling=coupling if solver == "pfista" else 0.0)
    st, report = st.prepare(batches, h.shape)
    variables = _fit(st, st.init(None, h.shape), h, skip, y, 4, 60)
    gaps[solver] = st.certificate(variables, batches)["rel_gap"]
    # The periodic certificate is finalize's, in one lean pass (to float32 rounding).
    assert gaps[solver] == pytest.approx(st.finalize(variables, batches)[1]["rel_gap"], rel=1e-3,
                                         abs=1e-7)
  print(f"relative gap after 60 passes: {gaps}")
  assert gaps["pfista"] <= 1e-6 < 1e-3 < gaps["fista"]


def test_pfista_recovers_a_planted_optimum():
  """y built so that the KKT conditions hold at a chosen W*: its certificate is ~0 and pfista
  from zero finds W*."""
  h, skip, _ = _data(13, n=6, size=6)
  u = gated.gate_filters(0, K, 2, C_IN, P)
  a = _dense(h, u)[:, : K * K * C_IN * P * C_OUT]  # the W = V - Z columns
  m = a.shape[0]
  rng = np.random.default_rng(1)
  w_star = rng.standard_normal((K * K * C_IN, P * C_OUT))
  w_star[:, 1] = 0  # one zero group
  beta = 0.05
  norms = np.linalg.norm(w_star, axis=0)
  sub = np.where(norms > 0, w_star / np.where(norms > 0, norms, 1), 0).reshape(-1)
  # The residual theta = r - A w* with A^T theta / M = beta * (w*_g / |w*_g|), least norm;
  # the zero group's A_g^T theta is checked to stay inside the ball below.
  theta = m * a @ np.linalg.solve(a.T @ a, beta * sub)
  r = a @ w_star.reshape(-1) + theta
  y = (skip + r.reshape(skip.shape)).astype(np.float32)
  q = (a.T @ theta / m).reshape(w_star.shape)
  assert np.linalg.norm(q[:, 1]) < beta
  batches = _batches(h, skip, y, 3)
  w = jnp.asarray(w_star.reshape(K, K, C_IN, P, C_OUT), jnp.float32)
  st, _ = _pfista(beta=beta, fista_iters=400, steps_per_epoch=2).prepare(batches, h.shape)
  planted = st.certificate({"v": w / 2, "z": -w / 2}, batches)
  assert planted["rel_gap"] < 1e-5 and planted["kkt_violation"] < 1e-2
  found = _fit(st, st.init(None, h.shape), h, skip, y, 3, 400)
  np.testing.assert_allclose(found["v"] - found["z"], w, atol=1e-3 * np.abs(w_star).max())
  assert st.certificate(found, batches)["rel_gap"] < 1e-5


@pytest.mark.parametrize("gates,coupling", [("gaussian", 0.0), ("white", 1.0)])
def test_pfista_reaches_one_optimum_from_any_start_and_batch_size(gates, coupling):
  h, skip, y = _smooth_data(2)
  objectives = {}
  for init, batch_size in (("zeros", 8), ("random", 8), ("zeros", 2)):
    st = _pfista(beta=0.01, relative_beta=True, fista_iters=150, init=init,
                 steps_per_epoch=len(h) // batch_size, gates=gates, coupling=coupling)
    batches = _batches(h, skip, y, batch_size)
    st, _ = st.prepare(batches, h.shape)
    start = st.init(jax.random.key(7), h.shape)
    assert (np.abs(np.asarray(start["w"])).max() > 0) == (init == "random")
    cert = st.certificate(_fit(st, start, h, skip, y, batch_size, 150), batches)
    assert cert["rel_gap"] < 1e-5, (init, batch_size)
    objectives[init, batch_size] = cert["objective"]
  ref = objectives["zeros", 8]
  for key, value in objectives.items():
    assert abs(value / ref - 1) < 1e-4, (key, objectives)


def test_pfista_state_holds_its_metric_and_needs_prepare():
  h, skip, y = _data(4)
  st = _pfista(beta=0.01, fista_iters=1, steps_per_epoch=2, gates="white", coupling=1.0)
  for needs_data in (lambda: st.init(None, h.shape), lambda: st.tx.init({})):
    with pytest.raises(RuntimeError, match="prepare"):
      needs_data()
  # The memory planner's stage has the prepared variables' and state's shapes without the data.
  planned = st.abstract_prepare(h.shape)
  abstract = jax.eval_shape(lambda: (lambda v: (v, planned.tx.init(v)))(
      planned.init(None, h.shape)))
  st, report = st.prepare(_batches(h, skip, y, 2), h.shape)
  variables = st.init(None, h.shape)
  state = st.tx.init(variables)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
      lambda a: (a.shape, a.dtype), (variables, state))
  d = K * K * C_IN
  inner = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, precond.PfistaState))
           if isinstance(s, precond.PfistaState)][0]
  assert inner.basis.shape == (d, d) and inner.scale.shape == (d,) and inner.nu.shape == (d, C_OUT)
  np.testing.assert_allclose(inner.basis @ inner.basis.T, np.eye(d), atol=1e-5)
  assert report["metric_rows"] == len(h) * 64 and report["lipschitz"] > 0
  buffers = lambda tree: {a.unsafe_buffer_pointer() for a in jax.tree.leaves(tree)}
  assert not buffers(variables) & buffers(state)  # donated together: no shared buffer


def test_pfista_certifies_with_bfloat16_steps_when_recentred():
  """bfloat16 rounding in the step's conv holds plain pfista far from the optimum; recentred
  on the exact gradient at each certificate (as the run does every --certify_every passes), the
  same steps certify as float32 ones do."""
  h, skip, y = _smooth_data(0)
  batches = _batches(h, skip, y, 4)
  gaps = {}
  for dtype, every in ((jnp.float32, 0), (jnp.bfloat16, 0), (jnp.bfloat16, 10)):
    st = _pfista(beta=0.01, relative_beta=True, fista_iters=100, steps_per_epoch=2,
                 gates="white", coupling=1.0, dtype=dtype)
    st, _ = st.prepare(batches, h.shape)
    found = _fit(st, st.init(None, h.shape), h, skip, y, 4, 100, recenter_every=every)
    gaps[jnp.dtype(dtype).name, every] = st.certificate(found, batches)["rel_gap"]
  print(f"relative gap after 100 passes: {gaps}")
  assert gaps["bfloat16", 10] <= 1e-6 and gaps["float32", 0] <= 1e-6
  assert gaps["bfloat16", 0] > 1e-4
