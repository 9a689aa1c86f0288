"""Synthetic volumes: determinism, normalised maps, the fastMRI layout and its grid consistency."""
import numpy as np
import pytest

from lwjax.data import synthetic
from lwjax.mri import sense
from lwjax.mri.fft import center_slices, fft2c, ifft2c

SIZE, COILS, SLICES = 48, 6, 4


@pytest.fixture(scope="module")
def volume():
  return synthetic.make_volume(np.random.default_rng(7), size=SIZE, coils=COILS, slices=SLICES)


def test_layout(volume):
  raw = (2 * SIZE, SIZE + SIZE // 8)
  assert volume["kspace"].shape == (SLICES, COILS) + raw and volume["kspace"].dtype == np.complex64
  assert volume["image"].shape == (SLICES, SIZE, SIZE) and volume["image"].dtype == np.complex64
  assert volume["maps"].shape == (COILS, SIZE, SIZE) and volume["maps"].dtype == np.complex64
  assert volume["rss"].shape == (SLICES, SIZE, SIZE) and volume["rss"].dtype == np.float32


def test_deterministic_from_seed(volume):
  again = synthetic.make_volume(np.random.default_rng(7), size=SIZE, coils=COILS, slices=SLICES)
  for key in volume:
    np.testing.assert_array_equal(volume[key], again[key])
  other = synthetic.make_volume(np.random.default_rng(8), size=SIZE, coils=COILS, slices=SLICES)
  assert not np.allclose(other["image"], volume["image"])


def _grid_coil_images(volume):
  images = ifft2c(volume["kspace"].astype(np.complex128))
  return images[(..., *center_slices(images.shape[-2:], (SIZE, SIZE)))]


def test_grid_sense_consistency(volume):
  """Crop the coil images to the grid, back to k-space, SENSE-combine: the image, plus noise."""
  kspace_grid = fft2c(_grid_coil_images(volume))
  combined = sense.zero_filled(kspace_grid, volume["maps"].astype(np.complex128), 1)
  noise = combined - volume["image"]
  std = 0.01 * np.abs(volume["image"]).max()
  assert abs(noise.std() / std - 1) < 0.1  # the combination of unit-norm maps keeps the noise std
  clean = synthetic.make_volume(np.random.default_rng(7), size=SIZE, coils=COILS, slices=SLICES,
                                noise_std=0)
  combined = sense.zero_filled(fft2c(_grid_coil_images(clean)), clean["maps"], 1)
  np.testing.assert_allclose(combined, clean["image"], atol=1e-5)


def test_rss_is_the_grid_root_sum_of_squares(volume):
  rss = np.sqrt(np.sum(np.abs(_grid_coil_images(volume)) ** 2, axis=1))
  np.testing.assert_allclose(volume["rss"], rss, rtol=1e-4, atol=1e-6)


def test_object_only_on_the_grid(volume):
  """Outside the central size x size of the raw image there is only noise."""
  images = ifft2c(volume["kspace"].astype(np.complex128))
  outside = np.ones(images.shape[-2:], bool)
  outside[center_slices(outside.shape, (SIZE, SIZE))] = False
  std = 0.01 * np.abs(volume["image"]).max()
  assert abs(images[..., outside].std() / std - 1) < 0.1


@pytest.mark.parametrize("rng", [None, np.random.default_rng(3)])
def test_coil_maps_normalised_and_smooth(rng):
  maps = synthetic.coil_maps(64, 8, rng=rng)
  assert maps.shape == (8, 64, 64) and maps.dtype == np.complex128
  np.testing.assert_allclose(np.sum(np.abs(maps) ** 2, axis=0), 1, atol=1e-12)
  for axis in (1, 2):
    assert np.abs(np.diff(maps, axis=axis)).max() < 0.1  # smooth: small pixel-to-pixel change
  # Each coil is strongest in its own part of the field of view.
  peaks = {np.unravel_index(np.argmax(np.abs(m)), m.shape) for m in maps}
  assert len(peaks) == 8


def test_phantom_tissues_phase_and_background():
  vol = synthetic.phantom(np.random.default_rng(0), 96, slices=3)
  assert vol.shape == (3, 96, 96) and vol.dtype == np.complex128
  inside = np.abs(vol) > 0
  assert not inside[:, 0, :].any() and not inside[:, :, 0].any()  # background is exactly zero
  assert 0.3 < inside.mean() < 0.9
  # Several tissues: at least five of the nominal levels each hold >= 2% of the object.
  levels = np.array(list(synthetic.TISSUES.values()))
  nearest = np.argmin(np.abs(np.abs(vol[inside])[:, None] - levels), axis=1)
  assert (np.bincount(nearest, minlength=levels.size) / nearest.size >= 0.02).sum() >= 5
  # Non-trivial yet smooth phase.
  phase = np.angle(vol[inside])
  assert phase.std() > 0.5
  for axis in (1, 2):
    step = np.angle(vol * np.roll(vol, 1, axis).conj())
    both = inside & np.roll(inside, 1, axis)
    assert np.abs(step[both]).max() < 0.5


def test_phantom_slices_vary_smoothly():
  vol = np.abs(synthetic.phantom(np.random.default_rng(1), 64, slices=12))
  change = lambda a, b: np.linalg.norm(vol[a] - vol[b]) / np.linalg.norm(vol[a])
  neighbours = [change(i, i + 1) for i in range(11)]
  assert 0 < min(neighbours) and max(neighbours) < 0.5
  # Change accumulates with distance: far slices differ more than neighbours.
  assert change(0, 6) > 1.5 * max(neighbours[:6]) and change(6, 11) > 1.5 * max(neighbours[6:])


def test_phantom_fine_structure():
  """Thin dark lines and small blobs give the image content at high spatial frequencies."""
  image = synthetic.phantom(np.random.default_rng(2), 128)[0]
  spectrum = np.abs(fft2c(np.abs(image))) ** 2
  ky, kx = np.meshgrid(np.arange(128) - 64, np.arange(128) - 64, indexing="ij")
  high = spectrum[np.hypot(ky, kx) > 32].sum() / spectrum.sum()
  assert high > 1e-3
