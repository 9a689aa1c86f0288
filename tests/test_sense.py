"""SENSE operators: adjointness, exact combination, CG-SENSE vs least squares, jit and grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.data import synthetic
from lwjax.mri import masks, sense


def _complex(rng, shape):
  return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _problem(seed=0, batch=(), coils=4, size=(12, 10)):
  rng = np.random.default_rng(seed)
  x = _complex(rng, batch + size)
  maps = _complex(rng, batch + (coils,) + size)
  y = _complex(rng, batch + (coils,) + size)
  mask = rng.random(size) < 0.4
  return x, y, maps, mask


def _inner(a, b):
  return np.vdot(np.asarray(a, np.complex128), np.asarray(b, np.complex128))


@pytest.mark.parametrize("batch", [(), (3,)])
def test_adjoint_float64(batch):
  x, y, maps, mask = _problem(batch=batch)
  lhs, rhs = _inner(sense.forward(x, maps, mask), y), _inner(x, sense.adjoint(y, maps, mask))
  assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_adjoint_float32_jax():
  x, y, maps, mask = (jnp.asarray(a, jnp.complex64) if a.dtype != bool else jnp.asarray(a)
                      for a in _problem(batch=(2,)))
  ax, ahy = sense.forward(x, maps, mask), sense.adjoint(y, maps, mask)
  assert isinstance(ax, jax.Array) and ax.dtype == jnp.complex64
  lhs, rhs = _inner(ax, y), _inner(x, ahy)
  assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_numpy_and_jax_agree():
  x, y, maps, mask = _problem(batch=(2,))
  for f, args in ((sense.forward, (x, maps, mask)), (sense.adjoint, (y, maps, mask)),
                  (sense.normal, (x, maps, mask, 0.3))):
    out = f(*args)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(np.asarray(f(*map(jnp.asarray, args[:3]), *args[3:])), out,
                               rtol=1e-4, atol=1e-4)


def test_normal_is_hermitian_positive():
  x, _, maps, mask = _problem()
  z = _complex(np.random.default_rng(1), x.shape)
  lhs = _inner(z, sense.normal(x, maps, mask, 0.5))
  rhs = _inner(sense.normal(z, maps, mask, 0.5), x)
  assert abs(lhs - rhs) / abs(lhs) < 1e-10
  assert _inner(x, sense.normal(x, maps, mask)).real >= 0
  np.testing.assert_allclose(sense.normal(x, maps, mask, 0.5),
                             sense.adjoint(sense.forward(x, maps, mask), maps, mask) + 0.5 * x)


def test_true_maps_recover_image():
  rng = np.random.default_rng(0)
  image = synthetic.phantom(rng, 32)[0]
  maps = synthetic.coil_maps(32, 6, rng=rng)
  kspace = sense.forward(image, maps, np.ones((32, 32), bool))
  np.testing.assert_allclose(sense.zero_filled(kspace, maps, 1), image, atol=1e-12)


def _explicit(maps, mask):
  """The encoding matrix (C H W, H W), column by column."""
  h, w = mask.shape
  eye = np.eye(h * w).reshape(h * w, h, w)
  return sense.forward(eye, maps, mask).reshape(h * w, -1).T


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_cg_matches_least_squares(lam):
  rng = np.random.default_rng(2)
  size, coils = (8, 8), 3
  maps = _complex(rng, (coils,) + size)
  mask = rng.random(size) < 0.5
  x0 = _complex(rng, size)
  y = mask * _complex(rng, (coils,) + size)
  a = _explicit(maps, mask)
  if lam:
    want = np.linalg.solve(a.conj().T @ a + lam * np.eye(a.shape[1]),
                           a.conj().T @ y.ravel() + lam * x0.ravel())
    got = sense.cg_sense(y, maps, mask, lam=lam, x0=x0, iters=200)
  else:  # CG from zero stays in the range of A^H: the minimum-norm least-squares solution.
    want = np.linalg.lstsq(a, y.ravel(), rcond=None)[0]
    got = sense.cg_sense(y, maps, mask, iters=200)
  np.testing.assert_allclose(got.ravel(), want, rtol=0, atol=1e-8 * np.abs(want).max())


def test_cg_batch_solves_each_image():
  x, y, maps, mask = _problem(batch=(2,))
  y = mask * y
  both = sense.cg_sense(y, maps, mask, lam=0.1, iters=8)
  for i in range(2):
    np.testing.assert_allclose(both[i], sense.cg_sense(y[i], maps[i], mask, lam=0.1, iters=8),
                               atol=1e-12)


def test_cg_beats_zero_filled():
  rng = np.random.default_rng(0)
  image = synthetic.phantom(rng, 64)[0]
  maps = synthetic.coil_maps(64, 8, rng=rng)
  mask = masks.poisson_disc((64, 64), 3, calib=(8, 8))
  kspace = sense.forward(image, maps, mask)
  error = lambda x: np.linalg.norm(x - image) / np.linalg.norm(image)
  zero_filled = error(sense.zero_filled(kspace, maps, mask))
  cg = error(sense.cg_sense(kspace, maps, mask, iters=20))
  assert cg < 0.3 * zero_filled


def test_cg_jit_and_grad():
  x, y, maps, mask = _problem(batch=(2,))
  y, prior = jnp.asarray(mask * y, jnp.complex64), jnp.asarray(x, jnp.complex64)

  def loss(params, kspace, maps, mask):
    lam, prior = params
    out = sense.cg_sense(kspace, maps, mask, lam=lam, x0=prior, iters=4)
    return jnp.sum(jnp.abs(out) ** 2), out

  grad = jax.jit(jax.grad(loss, has_aux=True))  # one compilation serves every case below
  finite = lambda tree: all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(tree))
  grads, out = grad((jnp.float32(0.1), prior), y, jnp.asarray(maps, jnp.complex64), mask)
  np.testing.assert_allclose(np.asarray(out), sense.cg_sense(np.asarray(y, np.complex128), maps,
                                                             mask, lam=0.1, x0=x, iters=4),
                             rtol=1e-3, atol=1e-3)
  assert finite(grads)
  # Zero data and zero prior: CG starts converged (zero residual).
  grads, out = grad((jnp.float32(0.1), jnp.zeros_like(prior)), jnp.zeros_like(y),
                    jnp.asarray(maps, jnp.complex64), mask)
  assert np.all(np.asarray(out) == 0) and finite(grads)
  # Full sampling with orthonormal maps makes A^H A = I: CG converges in one step and the later
  # steps run on rounding-level residuals, whose squares underflow in float32 unless guarded.
  maps = maps / np.linalg.norm(maps, axis=-3, keepdims=True)
  full = np.ones_like(mask)
  for lam in (0.0, 0.1):
    for scale in (1e-6, 1.0, 1e6):
      kspace = jnp.asarray(scale * sense.forward(x, maps, full), jnp.complex64)
      grads, _ = grad((jnp.float32(lam), jnp.zeros_like(prior)), kspace,
                      jnp.asarray(maps, jnp.complex64), full)
      assert finite(grads)


@pytest.mark.parametrize("xp", [np, jnp])
def test_channels_round_trip_keeps_each_part(xp):
  # Each part exactly, infinities and signed zeros too: a NaN must not appear from inf * 0.
  z = np.array([[1 + 2j, complex(np.inf, -0.0)], [complex(-0.0, np.inf), 3 - 4j]], np.complex64)
  channels = sense.to_channels(xp.asarray(z))
  assert channels.shape == (2, 2, 2) and channels.dtype == np.float32
  back = np.asarray(sense.to_complex(channels))
  assert back.dtype == np.complex64
  for part in (np.real, np.imag):
    np.testing.assert_array_equal(part(back), part(z))
    np.testing.assert_array_equal(np.signbit(part(back)), np.signbit(part(z)))
