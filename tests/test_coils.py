"""Coil maps from the 16 x 16 centre against the simulated sensitivities."""
import numpy as np
import pytest

from lwjax.data import synthetic
from lwjax.mri import coils, masks, sense
from lwjax.mri.fft import fft2c


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(1)
  image = synthetic.phantom(rng, 64)[0]
  maps = synthetic.coil_maps(64, 8, rng=rng)
  kspace = fft2c(maps * image)
  kspace += 0.01 * np.abs(image).max() / np.sqrt(2) * (
      rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
  kspace = kspace.astype(np.complex64)
  return dict(image=image, maps=maps, kspace=kspace, inside=np.abs(image) > 0,
              espirit=coils.estimate(kspace, "espirit", calib=16))


def _alignment(estimate, truth):
  """|<S_est, S_true>| / (||S_est|| ||S_true||) over coils, per pixel: 1 up to a phase."""
  norms = np.linalg.norm(estimate, axis=0) * np.linalg.norm(truth, axis=0)
  return np.abs(np.sum(estimate.conj() * truth, axis=0)) / np.maximum(norms, 1e-30)


def test_espirit_matches_true_maps(data):
  est = data["espirit"]
  assert est.shape == data["maps"].shape and est.dtype == np.complex64
  match = _alignment(est, data["maps"])[data["inside"]]
  assert (match > 0.95).mean() > 0.995 and np.median(match) > 0.99
  # Unit norm over coils where the map is kept, and kept on the whole object.
  norm = np.linalg.norm(est, axis=0)
  assert np.all(norm[data["inside"]] > 0)
  np.testing.assert_allclose(norm[norm > 0], 1, atol=1e-4)


def test_espirit_uses_only_the_centre(data):
  mask = masks.poisson_disc((64, 64), 4, calib=(16, 16))
  np.testing.assert_allclose(coils.espirit(data["kspace"] * mask), data["espirit"], atol=1e-5)


@pytest.mark.parametrize("method", coils.METHODS)
def test_rectangular_calibration_from_cartesian_lines(data, method):
  """A 1D Cartesian mask samples whole centre columns: all rows of them can calibrate."""
  mask = masks.cartesian((64, 64), 4, center_fraction=0.25)  # 16 centre columns
  est = coils.estimate(data["kspace"] * mask, method, calib=(64, 16))
  assert (_alignment(est, data["maps"])[data["inside"]] > 0.95).mean() > 0.98


def test_espirit_phase_is_smooth_and_reproducible(data):
  est = data["espirit"]
  np.testing.assert_array_equal(est, coils.espirit(data["kspace"]))
  # The phase left between estimate and truth (ESPIRiT's per-pixel ambiguity, fixed against a
  # virtual coil) must vary slowly across the object.
  relative = np.sum(est * data["maps"].conj(), axis=0)
  for axis in (0, 1):
    step = np.angle(relative * np.roll(relative, 1, axis).conj())
    both = data["inside"] & np.roll(data["inside"], 1, axis)
    assert np.abs(step[both]).max() < 0.2


def test_espirit_sense_combination_recovers_image(data):
  combined = sense.zero_filled(data["kspace"], data["espirit"], 1)
  inside = data["inside"]
  error = np.abs(np.abs(combined) - np.abs(data["image"]))[inside]
  assert np.linalg.norm(error) / np.linalg.norm(data["image"][inside]) < 0.03


def test_lowres_matches_true_maps(data):
  est = coils.estimate(data["kspace"], "lowres")
  assert est.shape == data["maps"].shape and est.dtype == np.complex64
  # Looser than ESPIRiT: the Hann-windowed centre blurs the maps and the object's edge.
  match = _alignment(est, data["maps"])[data["inside"]]
  assert (match > 0.95).mean() > 0.98
  assert np.all(est[:, 0, 0] == 0)  # background corner: no signal, no map


@pytest.mark.parametrize("call, match", [
    (lambda k: coils.estimate(k, "walsh"), "method"),
    (lambda k: coils.espirit(k, calib=80), "calib"),
    (lambda k: coils.lowres(k, calib=0), "calib"),
    (lambda k: coils.espirit(k, calib=8, kernel=10), "kernel"),
    (lambda k: coils.espirit(k[0]), "kspace"),
])
def test_errors(data, call, match):
  with pytest.raises(ValueError, match=match):
    call(data["kspace"])


def test_espirit_eigenvectors_settle_where_two_eigenvalues_are_close():
  # Where the object is cut by the grid's edge, ESPIRiT's operator has a second eigenvalue close
  # to the first; the power iteration must still give the dominant eigenvector (float64 eigh).
  rng = np.random.default_rng(0)
  c, n = 8, 200
  q, _ = np.linalg.qr(rng.standard_normal((n, c, c)) + 1j * rng.standard_normal((n, c, c)))
  ratio = rng.uniform(0.9, 0.97, n)
  values = np.stack([np.ones(n), ratio] + [rng.uniform(0, 0.5, n) for _ in range(c - 2)], -1)
  g = (q * values[:, None, :]) @ np.swapaxes(q.conj(), -1, -2)
  start = rng.standard_normal(c) + 1j * rng.standard_normal(c)
  value, vector = coils._top_eigenpairs(g, start)
  w, v = np.linalg.eigh(g)
  np.testing.assert_allclose(value, w[:, -1], rtol=1e-3)
  np.testing.assert_allclose(np.abs(np.sum(vector.conj() * v[:, :, -1], -1)), 1, atol=5e-3)
