"""The JAX metrics against scikit-image (fastMRI's evaluate.py) and float64 NumPy references."""
import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lwjax import metrics

SSIM_TOL = 1e-4
PSNR_TOL = 1e-4  # dB


def _phantom(h, w, rng):
  """A smooth blob plus edges: structured like an MRI magnitude image, values in [0, ~1]."""
  yy, xx = np.mgrid[-1:1:h * 1j, -1:1:w * 1j]
  img = np.exp(-2 * (xx**2 + yy**2)) + 0.5 * ((xx / 0.7)**2 + (yy / 0.5)**2 < 1)
  img += 0.3 * (np.abs(xx - 0.2 * rng.standard_normal()) < 0.1)
  return img / img.max()


def _pairs(kind, n, h, w, scale, seed=0):
  """``n`` float32 (pred, target) pairs ``(n, h, w)``: random, or a phantom with noise and blur."""
  rng = np.random.default_rng(seed)
  if kind == "random":
    target = rng.random((n, h, w))
    pred = rng.random((n, h, w))
  else:
    target = np.stack([_phantom(h, w, rng) for _ in range(n)])
    blurred = (target + np.roll(target, 1, -1) + np.roll(target, 1, -2)) / 3
    pred = blurred + 0.02 * rng.standard_normal((n, h, w))
  return (scale * pred).astype(np.float32), (scale * target).astype(np.float32)


def _reference(pred, target, data_range=None):
  """scikit-image / NumPy per image, in float64 on the same (float32) inputs."""
  pred, target = pred.astype(np.float64), target.astype(np.float64)
  out = {"psnr": [], "ssim": [], "nmse": []}
  for i, (p, t) in enumerate(zip(pred, target)):
    dr = t.max() if data_range is None else np.broadcast_to(data_range, len(target))[i]
    out["psnr"].append(peak_signal_noise_ratio(t, p, data_range=dr))
    out["ssim"].append(structural_similarity(t, p, data_range=dr))
    out["nmse"].append(np.linalg.norm(t - p)**2 / np.linalg.norm(t)**2)
  return {k: np.array(v) for k, v in out.items()}


CASES = [  # kind, n, h, w, scale, data_range
    ("random", 3, 16, 16, 1.0, None),
    ("random", 2, 20, 33, 255.0, 255.0),
    ("structured", 3, 48, 40, 1.0, None),
    ("structured", 2, 64, 64, 3e-4, None),  # fastMRI magnitudes are of this order
    ("structured", 2, 32, 24, 1.0, 2.0),
    ("structured", 2, 24, 32, 100.0, np.array([120.0, 80.0])),
]


@pytest.mark.parametrize("kind,n,h,w,scale,data_range", CASES)
def test_matches_scikit_image(kind, n, h, w, scale, data_range):
  pred, target = _pairs(kind, n, h, w, scale)
  ref = _reference(pred, target, data_range)
  np.testing.assert_allclose(metrics.psnr(pred=pred, target=target, data_range=data_range), ref["psnr"], atol=PSNR_TOL)
  np.testing.assert_allclose(metrics.ssim(pred=pred, target=target, data_range=data_range), ref["ssim"], atol=SSIM_TOL)
  np.testing.assert_allclose(metrics.nmse(pred=pred, target=target), ref["nmse"], rtol=1e-5)


def test_ssim_options_match_scikit_image():
  pred, target = _pairs("structured", 2, 30, 30, 1.0)
  got = metrics.ssim(pred=pred, target=target, data_range=1.0, win_size=5, k1=0.02,
                     k2=0.05)
  ref = [structural_similarity(t.astype(np.float64), p.astype(np.float64), data_range=1.0,
                               win_size=5, K1=0.02, K2=0.05) for p, t in zip(pred, target)]
  np.testing.assert_allclose(got, ref, atol=SSIM_TOL)


def test_batched_equals_one_by_one_and_jit_equals_eager():
  pred, target = _pairs("structured", 4, 32, 40, 1.0)
  for fn in (metrics.psnr, metrics.ssim, metrics.nmse):
    batched = fn(pred=pred, target=target)
    single = np.array([fn(pred=p, target=t) for p, t in zip(pred, target)])
    np.testing.assert_allclose(batched, single, rtol=1e-6)
    with jax.disable_jit():
      np.testing.assert_allclose(fn(pred=pred, target=target), batched, rtol=1e-6)
  # Any leading axes are batch axes.
  np.testing.assert_allclose(
      metrics.ssim(pred=pred.reshape(2, 2, 32, 40), target=target.reshape(2, 2, 32, 40)),
      metrics.ssim(pred=pred, target=target).reshape(2, 2), rtol=1e-6)


def test_perfect_prediction():
  _, target = _pairs("structured", 2, 32, 32, 1.0)
  np.testing.assert_allclose(metrics.ssim(pred=target, target=target), 1.0, atol=1e-6)
  np.testing.assert_array_equal(metrics.nmse(pred=target, target=target), 0.0)
  assert np.all(np.isposinf(metrics.psnr(pred=target, target=target)))


def test_images_are_keyword_only():
  """scikit-image and fastMRI take (target, prediction): a positional call is refused, so a call
  written in their order cannot silently swap the two (PSNR, SSIM and NMSE all change)."""
  pred, target = _pairs("structured", 2, 32, 32, 1.0)
  rng = np.random.default_rng(0)
  pred4, target4 = (rng.random((2, 16, 16, 2)).astype(np.float32) for _ in range(2))
  calls = [(metrics.psnr, pred, target), (metrics.ssim, pred, target), (metrics.nmse, pred, target),
           (metrics.slice_metrics, pred4, target4), (metrics.per_slice, pred4, target4),
           (metrics.volume_metrics, pred, target)]
  for fn, p, t in calls:
    with pytest.raises(TypeError):
      fn(p, t)
  with pytest.raises(TypeError):
    metrics.per_file(pred4, target4, np.zeros(2))
  # The swap matters: the metrics are not symmetric in their images.
  assert abs(float(metrics.psnr(pred=pred, target=target).mean())
             - float(metrics.psnr(pred=target, target=pred).mean())) > 0.01


def test_magnitude():
  x = np.random.default_rng(0).standard_normal((3, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(metrics.magnitude(x), np.abs(x[..., 0] + 1j * x[..., 1]), rtol=1e-6)
  with pytest.raises(ValueError, match="real, imaginary"):
    metrics.magnitude(x[..., :1])


def _complex_pair(shape, seed=0):
  """2-channel (pred, target) float32 with a structured magnitude and a smooth phase."""
  rng = np.random.default_rng(seed)
  h, w = shape[-2:]
  mag = np.stack([_phantom(h, w, rng) for _ in range(int(np.prod(shape[:-2])))]).reshape(shape)
  target = mag * np.exp(1j * np.linspace(0, 2, w))
  pred = target + 0.03 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
  to_channels = lambda z: np.stack([z.real, z.imag], -1).astype(np.float32)
  return to_channels(pred), to_channels(target)


@pytest.mark.parametrize("shape", [(7, 32, 24), (3, 3, 20, 20)])
def test_slice_metrics(shape):
  pred, target = _complex_pair(shape)
  mag = lambda x: np.abs(x[..., 0].astype(np.float64) + 1j * x[..., 1]).reshape(-1, *shape[-2:])
  ref = _reference(mag(pred), mag(target))
  n = int(np.prod(shape[:-2]))
  # per_slice runs a few slices at a time, the last chunk padded (chunk_slices=6 of the 3D
  # input: 2 volumes of 3 slices, the second chunk one volume and a copy): the same values.
  for got in (metrics.slice_metrics(pred=pred, target=target),
              metrics.per_slice(pred=pred, target=target),
              metrics.per_slice(pred=pred, target=target, chunk_slices=4),
              metrics.per_slice(pred=pred, target=target, chunk_slices=6)):
    for key, tol in (("psnr", PSNR_TOL), ("ssim", SSIM_TOL), ("nmse", 1e-6)):
      assert got[key].shape == (n,)
      np.testing.assert_allclose(got[key], ref[key], atol=tol)


def test_invalid_inputs():
  pred, target = _pairs("random", 2, 16, 16, 1.0)
  with pytest.raises(ValueError, match="one shape"):
    metrics.psnr(pred=pred, target=target[:, :8])
  with pytest.raises(ValueError, match="win_size"):
    metrics.ssim(pred=pred, target=target, win_size=6)
  with pytest.raises(ValueError, match="win_size"):
    metrics.ssim(pred=pred[:, :5], target=target[:, :5])
  with pytest.raises(ValueError, match="N, H, W, 2"):
    metrics.slice_metrics(pred=pred[0], target=target[0])


def test_volume_metrics_match_fastmri_evaluate():
  # fastMRI's evaluate.py, in float64 NumPy / scikit-image: data range = the volume's maximum,
  # PSNR and NMSE over the whole volume, SSIM averaged over its slices.
  pred, target = _pairs("phantom", 5, 32, 40, scale=3.0, seed=4)
  target[0] *= 0.5  # Slices of unequal brightness: a volume maximum is not each slice's.
  p, t = pred.astype(np.float64), target.astype(np.float64)
  peak = t.max()
  expected = {
      "psnr": peak_signal_noise_ratio(t, p, data_range=peak),
      "ssim": np.mean([structural_similarity(t[i], p[i], data_range=peak) for i in range(5)]),
      "nmse": np.linalg.norm(t - p) ** 2 / np.linalg.norm(t) ** 2}
  got = metrics.volume_metrics(pred=pred, target=target)
  assert float(got["psnr"]) == pytest.approx(expected["psnr"], abs=PSNR_TOL)
  assert float(got["ssim"]) == pytest.approx(expected["ssim"], abs=SSIM_TOL)
  assert float(got["nmse"]) == pytest.approx(expected["nmse"], rel=1e-4)
  # Not the slice-based means (the volume's maximum and pooled errors differ from each slice's).
  assert abs(float(metrics.psnr(pred=pred, target=target).mean()) - expected["psnr"]) > 0.1
  with pytest.raises(ValueError, match=r"one volume \(S, H, W\)"):
    metrics.volume_metrics(pred=pred[0], target=target[0])


def test_format_means_writes_every_metric_with_its_unit_and_format():
  line = metrics.format_means({"psnr": 25.0234, "ssim": 0.834912, "nmse": 0.0203201})
  assert line == "PSNR 25.02 dB SSIM 0.8349 NMSE 0.02032"
  assert metrics.format_means({k: 1.0 for k in metrics.NAMES}, sep="  ").count("  ") == 2
