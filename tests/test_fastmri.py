"""The fastMRI file format: writing, reading, validation errors and the grid."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from lwjax import files
from lwjax.data import fastmri, synthetic
from lwjax.mri.fft import fft2c, ifft2c

NS = {"m": "http://www.ismrm.org/ISMRMRD"}


def _random_volume(rng, shape=(3, 4, 64, 36), recon=(32, 32)):
  kspace = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
  return kspace, rng.random((shape[0], *recon)).astype(np.float32)


def _h5(path, attrs=None, **datasets):
  with h5py.File(path, "w") as f:
    for k, v in datasets.items():
      f[k] = v
    f.attrs.update(attrs or {})
  return path


def test_round_trip(tmp_path):
  kspace, rss = _random_volume(np.random.default_rng(0))
  path = tmp_path / "vol.h5"
  fastmri.write_volume(path, kspace, rss, patient_id="p7", attrs={"extra": 3})
  assert [p.name for p in tmp_path.iterdir()] == ["vol.h5"]  # no temporary file left

  info = fastmri.open_volume(path)
  assert (info.num_slices, info.num_coils, info.kspace_shape) == (3, 4, (3, 4, 64, 36))
  assert info.attrs["acquisition"] == "CORPD_FBK" and info.attrs["patient_id"] == "p7"
  assert info.attrs["extra"] == 3
  np.testing.assert_allclose(info.attrs["max"], rss.max())
  np.testing.assert_allclose(info.attrs["norm"], np.linalg.norm(kspace), rtol=1e-5)
  for i in range(3):
    got = fastmri.read_slice(path, i)
    assert got.dtype == np.complex64 and got.shape == (4, 64, 36)
    np.testing.assert_array_equal(got, kspace[i])
  with h5py.File(path) as f:
    np.testing.assert_array_equal(f[fastmri.RSS][()], rss)
    header = ET.fromstring(f[fastmri.HEADER][()])

  # Parsed the way fastMRI's SliceDataset parses it.
  size = lambda space: tuple(int(header.find(f"m:encoding/m:{space}/m:matrixSize/m:{a}", NS).text)
                             for a in "xyz")
  assert size("encodedSpace") == (64, 36, 1) and size("reconSpace") == (32, 32, 1)
  lims = "m:encoding/m:encodingLimits/m:kspace_encoding_step_1/m:"
  center, maximum = (int(header.find(lims + k, NS).text) for k in ("center", "maximum"))
  assert 36 // 2 - center == 0 and maximum + 1 == 36  # fastMRI's padding_left, padding_right


def test_write_is_atomic(tmp_path):
  kspace, rss = _random_volume(np.random.default_rng(0))
  path = tmp_path / "vol.h5"
  fastmri.write_volume(path, kspace, rss)
  with pytest.raises(RuntimeError), files.atomic_write(path) as tmp:
    tmp.write_bytes(b"half a file")
    raise RuntimeError("crash while writing")
  assert [p.name for p in tmp_path.iterdir()] == ["vol.h5"]
  np.testing.assert_array_equal(fastmri.read_slice(path, 1), kspace[1])
  with pytest.raises(fastmri.DataError, match="vol.h5.*reconstruction_rss.*expected real"):
    fastmri.write_volume(path, kspace, rss[:2])


def test_to_grid_is_crop_in_image_space():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(2, 24, 20)) + 1j * rng.normal(size=(2, 24, 20))
  oversampled = np.zeros((2, 48, 23), complex)  # 2x readout, wider phase FOV, odd width
  oversampled[:, 12:36, 1:21] = image  # centre index 24 -> 12, 11 -> 10
  grid = fastmri.to_grid(fft2c(oversampled), (24, 20))
  assert grid.dtype == np.complex64 and grid.shape == (2, 24, 20)
  np.testing.assert_allclose(grid, fft2c(image), atol=1e-5)
  padded = fastmri.to_grid(fft2c(image), 28)  # zero-pads where the grid is larger
  np.testing.assert_allclose(ifft2c(padded)[:, 2:26, 4:24], image, atol=1e-5)
  assert np.abs(ifft2c(padded)[:, :, :4]).max() < 1e-5


def test_to_grid_synthetic_volume(tmp_path):
  size = 32
  vol = synthetic.make_volume(np.random.default_rng(0), size=size, coils=4, slices=2,
                              noise_std=0.0)
  path = tmp_path / "synth.h5"
  fastmri.write_volume(path, vol["kspace"], vol["rss"])
  for s in range(2):
    coil_images = ifft2c(fastmri.to_grid(fastmri.read_slice(path, s), size))
    rss = np.sqrt((np.abs(coil_images) ** 2).sum(0))
    np.testing.assert_allclose(rss, vol["rss"][s], atol=1e-4 * vol["rss"].max())
    combined = (np.conj(vol["maps"]) * coil_images).sum(0)
    np.testing.assert_allclose(np.abs(combined), np.abs(vol["image"][s]),
                               atol=1e-3 * np.abs(vol["image"]).max())


def test_list_volumes(tmp_path):
  kspace, rss = _random_volume(np.random.default_rng(0))
  for name in ("b.h5", "a.h5"):
    (tmp_path / "plain" / "train").mkdir(parents=True, exist_ok=True)
    fastmri.write_volume(tmp_path / "plain" / "train" / name, kspace, rss)
  (tmp_path / "fastmri" / "multicoil_val").mkdir(parents=True)
  fastmri.write_volume(tmp_path / "fastmri" / "multicoil_val" / "file1000.h5", kspace, rss)
  (tmp_path / "plain" / "train" / "._a.h5").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
  assert [p.name for p in fastmri.list_volumes(tmp_path / "plain", "train")] == ["a.h5", "b.h5"]
  assert [p.name for p in fastmri.list_volumes(tmp_path / "fastmri", "val")] == ["file1000.h5"]
  # Pointed at a split folder itself: the error says where --data_dir should point.
  with pytest.raises(fastmri.DataError, match=r"multicoil_val holds .h5 files itself: --data_dir "
                                               r"is the folder that holds the split folders, "
                                               r"e.g. .*fastmri\?"):
    fastmri.list_volumes(tmp_path / "fastmri" / "multicoil_val", "train")

  with pytest.raises(fastmri.DataError, match=r"plain.*split 'val'.*plain/val \(missing\)"):
    fastmri.list_volumes(tmp_path / "plain", "val")
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(fastmri.DataError, match=r"empty/train \(empty of \.h5 files\)"):
    fastmri.list_volumes(tmp_path / "empty", "train")
  with pytest.raises(fastmri.DataError, match="split: expected one of"):
    fastmri.list_volumes(tmp_path / "plain", "test")
  # Both layouts at once: which one is meant is the user's to say.
  (tmp_path / "plain" / "multicoil_train").mkdir()
  fastmri.write_volume(tmp_path / "plain" / "multicoil_train" / "c.h5", kspace, rss)
  with pytest.raises(fastmri.DataError, match=r"split 'train' is in both .*plain/train and "
                                               r".*plain/multicoil_train"):
    fastmri.list_volumes(tmp_path / "plain", "train")
  # One folder linked under both names is one layout.
  (tmp_path / "fastmri" / "val").symlink_to(tmp_path / "fastmri" / "multicoil_val")
  assert [p.name for p in fastmri.list_volumes(tmp_path / "fastmri", "val")] == ["file1000.h5"]


def test_list_volumes_names_the_files_it_ignores(tmp_path, caplog):
  kspace, rss = _random_volume(np.random.default_rng(0))
  split = tmp_path / "train"
  (split / "sub").mkdir(parents=True)
  fastmri.write_volume(split / "a.h5", kspace, rss)
  fastmri.write_volume(split / "sub" / "b.h5", kspace, rss)
  fastmri.write_volume(split / "c.hdf5", kspace, rss)
  with caplog.at_level("WARNING"):
    assert [p.name for p in fastmri.list_volumes(tmp_path, "train")] == ["a.h5"]
  assert "ignoring 2 file(s) in sub-folders or not named *.h5" in caplog.text


@pytest.mark.parametrize("make, match", [
    (lambda p: p, r"missing.h5: expected a fastMRI .h5 volume, found no such file"),
    (lambda p: (p.mkdir(), p)[1], r"missing.h5: expected a fastMRI .h5 volume, found a directory"),
    (lambda p: (p.symlink_to(p.with_name("gone.h5")), p)[1],
     r"missing.h5: expected a fastMRI .h5 volume, found a broken symbolic link"),
    (lambda p: (p.touch(), p)[1], r"missing.h5: expected an HDF5 file, found an empty one"),
    (lambda p: (p.write_text("not hdf5"), p)[1], r"missing.h5: expected an HDF5 file"),
    (lambda p: _h5(p, other=np.zeros(3)),
     r"missing.h5: expected a dataset 'kspace', found keys \['other'\]"),
    (lambda p: _h5(p, kspace=np.zeros((2, 3, 8, 8), np.float32)),
     r"missing.h5: key 'kspace': expected a complex dtype, found float32 \(2, 3, 8, 8\)$"),
    (lambda p: _h5(p, kspace=np.zeros((2, 3, 8, 8, 2), np.float32)),
     r"missing.h5: key 'kspace': expected a complex dtype, found float32 .*real and imaginary"),
    (lambda p: _h5(p, kspace=np.zeros((2, 8, 8), np.complex64)),
     r"missing.h5: key 'kspace': expected .*4-D.*found shape \(2, 8, 8\).*multi-coil"),
    (lambda p: _h5(p, kspace=np.zeros((8, 8), np.complex64)),
     r"missing.h5: key 'kspace': expected .*4-D.*found shape \(8, 8\)"),
    # fastMRI test/challenge files: undersampled k-space, no target.
    (lambda p: _h5(p, kspace=np.ones((2, 3, 8, 8), np.complex64), mask=np.ones(8, bool)),
     r"missing.h5: key 'mask': a fastMRI test/challenge file .*expected fully sampled"),
    (lambda p: _h5(p, kspace=np.ones((2, 3, 8, 8), np.complex64), attrs={"acceleration": 4}),
     r"missing.h5: attr 'acceleration': a fastMRI test/challenge file"),
])
def test_open_volume_errors(tmp_path, make, match):
  path = make(tmp_path / "missing.h5")
  for read in (fastmri.open_volume, lambda p: fastmri.read_slice(p, 0)):
    with pytest.raises(fastmri.DataError, match=match):
      read(path)


def test_damaged_files_name_the_file(tmp_path):
  kspace, rss = _random_volume(np.random.default_rng(0))
  path = tmp_path / "vol.h5"
  fastmri.write_volume(path, kspace, rss)
  good = path.read_bytes()
  # A file another process is writing (HDF5 locks it): not called damaged.
  writer = subprocess.Popen(
      [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'a'); print(1, "
       "flush=True); sys.stdin.read()", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      env={k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}, text=True)
  try:
    assert writer.stdout.readline().strip() == "1"
    with pytest.raises(fastmri.DataError, match=r"vol.h5: expected a readable HDF5 file, found it "
                                                 r"locked.*HDF5_USE_FILE_LOCKING=FALSE"):
      fastmri.open_volume(path)
  finally:
    writer.communicate("", timeout=60)
  path.write_bytes(good[:len(good) // 2])  # an interrupted download
  for read in (fastmri.open_volume, lambda p: fastmri.read_slice(p, 0)):
    with pytest.raises(fastmri.DataError, match=r"vol.h5: expected a readable HDF5 file, found a "
                                                 r"damaged or truncated one"):
      read(path)
  # A damaged compressed chunk: the file opens, the slice does not read.
  with h5py.File(path, "w") as f:
    f.create_dataset("kspace", data=kspace, chunks=(1,) + kspace.shape[1:], compression="gzip")
  with h5py.File(path, "r") as f:
    offset = f["kspace"].id.get_chunk_info(1).byte_offset
  raw = bytearray(path.read_bytes())
  raw[offset:offset + 64] = b"\xff" * 64
  path.write_bytes(bytes(raw))
  fastmri.read_slice(path, 0)
  with pytest.raises(fastmri.DataError, match=r"vol.h5: key 'kspace', slice 1: expected readable "
                                               r"data, found a damaged file"):
    fastmri.read_slice(path, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, complex(0, -np.inf)])
def test_read_slice_rejects_non_finite(tmp_path, bad):
  kspace, rss = _random_volume(np.random.default_rng(0))
  kspace[2, 1, 5, 7] = bad
  path = tmp_path / "vol.h5"
  fastmri.write_volume(path, kspace, rss)
  fastmri.read_slice(path, 1)
  with pytest.raises(fastmri.DataError, match=r"vol.h5: key 'kspace', slice 2: expected finite "
                                               r"values, found 1 NaN/Inf"):
    fastmri.read_slice(path, 2)
  with pytest.raises(fastmri.DataError, match=r"vol.h5: key 'kspace'.*\[0, 3\), found 3"):
    fastmri.read_slice(path, 3)


def _rewrite_kspace(path, kspace):
  with h5py.File(path, "r+") as f:
    del f[fastmri.KSPACE]
    f[fastmri.KSPACE] = kspace


@pytest.mark.parametrize("axes, match", [
    ((0, 1, 3, 2), r"a.h5: key 'kspace': expected \(slices, coils, H, W\) with \(H, W\) = "
                   r"\(64, 36\).*found shape \(3, 4, 36, 64\): the last two axes look swapped"),
    ((0, 2, 3, 1), r"a.h5: key 'kspace': .*found shape \(3, 64, 36, 4\): the coils look like the "
                   r"last axis"),
])
def test_kspace_in_another_axis_order_than_its_header_says_is_refused(tmp_path, axes, match):
  # Read as stored, such files gave rotated images or 64 "coils" of 36 x 4 images, silently.
  kspace, rss = _random_volume(np.random.default_rng(0))
  path = tmp_path / "a.h5"
  fastmri.write_volume(path, kspace, rss)
  with h5py.File(path) as f:
    assert fastmri.read_header(f).encoded == (64, 36)
  _rewrite_kspace(path, kspace.transpose(axes))
  for read in (fastmri.open_volume, lambda p: fastmri.read_slice(p, 0)):
    with pytest.raises(fastmri.DataError, match=match):
      read(path)


def test_without_a_usable_header_only_impossible_layouts_are_refused(tmp_path, caplog):
  kspace, rss = _random_volume(np.random.default_rng(0))
  path = tmp_path / "a.h5"
  fastmri.write_volume(path, kspace, rss)
  _rewrite_kspace(path, kspace[..., :30])  # another width than the header's: a warning only
  with caplog.at_level("WARNING"):
    info = fastmri.open_volume(path)
  assert info.kspace_shape == (3, 4, 64, 30) and info.acquired is None  # its limits: unbelieved
  assert "encodedSpace matrix (64, 36) differs" in caplog.text
  with h5py.File(path, "r+") as f:  # padded with whitespace and NULs, as some writers store it
    xml = b"\n " + bytes(f[fastmri.HEADER][()]) + b"\0\0"
    del f[fastmri.HEADER]
    f[fastmri.HEADER] = np.void(xml)
    assert fastmri.read_header(f).encoded == (64, 36)
  with caplog.at_level("WARNING"):
    for header in (b"not xml", b"<ismrmrdHeader/>", None):
      with h5py.File(path, "r+") as f:
        del f[fastmri.HEADER]
        if header is not None:
          f[fastmri.HEADER] = np.bytes_(header)
        assert fastmri.read_header(f).encoded is None
      assert fastmri.open_volume(path).kspace_shape == (3, 4, 64, 30)
  assert "key 'ismrmrd_header': not an ISMRMRD XML header" in caplog.text
  _rewrite_kspace(path, kspace.transpose(0, 2, 3, 1))  # no header, coils last: still refused
  with pytest.raises(fastmri.DataError, match=r"a.h5: key 'kspace': .*\(3, 64, 36, 4\): more "
                                              r"coils than k-space rows or columns"):
    fastmri.open_volume(path)


def test_acquired_columns_read_as_fastmri_reads_them(tmp_path):
  kspace, rss = _random_volume(np.random.default_rng(0), shape=(1, 2, 64, 36))
  path = tmp_path / "a.h5"
  fastmri.write_volume(path, kspace, rss)
  assert fastmri.open_volume(path).acquired == (0, 36)  # every column
  # As fastMRI knee files say it (W = 368, center 166, maximum 331: columns 18 .. 349), scaled.
  fastmri.write_volume(path, kspace, rss, acquired=(4, 32))
  with h5py.File(path) as f:
    root = ET.fromstring(bytes(f[fastmri.HEADER][()]))
  limits = root.find("m:encoding/m:encodingLimits/m:kspace_encoding_step_1", NS)
  assert (limits.find("m:center", NS).text, limits.find("m:maximum", NS).text) == ("14", "27")
  assert fastmri.open_volume(path).acquired == (4, 32)
  with h5py.File(path, "r+") as f:  # limits that would start before column 0: not believed
    xml = bytes(f[fastmri.HEADER][()]).replace(b"<center>14</center>", b"<center>40</center>")
    del f[fastmri.HEADER]
    f[fastmri.HEADER] = np.bytes_(xml)
  assert fastmri.open_volume(path).acquired is None
