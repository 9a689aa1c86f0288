"""The fastMRI multi-coil HDF5 format: writing, listing, validating and reading volumes.

A volume file holds ``kspace`` (slices, coils, H, W) complex64, with H the readout (frequency
encoding, oversampled 2x in fastMRI knee data) and W the phase encoding; ``reconstruction_rss``
(slices, h, w) float32 on the reconstruction grid; attrs ``max``, ``norm``, ``acquisition``,
``patient_id``; and ``ismrmrd_header``, the ISMRMRD XML header (``encodedSpace`` matrix (H, W),
``reconSpace`` matrix (h, w)). Every problem with an input raises :class:`DataError` naming the
file, the HDF5 key and what was expected vs found.
"""
import dataclasses
import math
from pathlib import Path
from typing import Any, Optional
import xml.etree.ElementTree as ElementTree

from absl import logging
import h5py
import numpy as np

from lwjax import files
from lwjax.mri.fft import center_slices, fft2c, ifft2c

KSPACE = "kspace"
RSS = "reconstruction_rss"
HEADER = "ismrmrd_header"
MASK = "mask"  # fastMRI test/challenge files: the sampled k-space columns (W,)
SPLITS = ("train", "val")
# What marks a fastMRI test/challenge file: its k-space is already undersampled (zeros where
# ``mask`` is 0) and it has no fully sampled target, so it can be neither trained nor scored on.
UNDERSAMPLED_MARKS = ("mask", "acceleration", "num_low_frequency")
_PIXEL_MM = 0.5  # nominal in-plane resolution written into synthetic headers

_HEADER_XML = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="http://www.ismrm.org/ISMRMRD ismrmrd.xsd">
  <measurementInformation>
    <patientPosition>HFS</patientPosition>
    <protocolName>{acquisition}</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>lwjax</systemVendor>
    <systemModel>synthetic</systemModel>
    <receiverChannels>{coils}</receiverChannels>
  </acquisitionSystemInformation>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{H}</x><y>{W}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{H_mm}</x><y>{W_mm}</y><z>3</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{h_mm}</x><y>{w_mm}</y><z>3</z></fieldOfView_mm>
    </reconSpace>
    <trajectory>cartesian</trajectory>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{W_max}</maximum>\
<center>{W_center}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center>\
</kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>{S_max}</maximum><center>{S_center}</center></slice>
    </encodingLimits>
  </encoding>
</ismrmrdHeader>
"""


class DataError(ValueError):
  """A data file, directory or cache entry is missing or not what the pipeline expects."""


@dataclasses.dataclass
class VolumeInfo:
  """What :func:`open_volume` found: ``kspace_shape`` is (slices, coils, H, W)."""
  path: Path
  num_slices: int
  num_coils: int
  kspace_shape: tuple[int, int, int, int]
  attrs: dict[str, Any]
  # From the header (``Header``): the acquired columns [lo, hi) of W, the reconstruction grid.
  acquired: Optional[tuple[int, int]] = None
  recon: Optional[tuple[int, int]] = None


def ismrmrd_header(kspace_shape, recon_shape, *, acquisition="CORPD_FBK",
                   acquired=None) -> bytes:
  """The ISMRMRD XML header for k-space (S, C, H, W) reconstructed on an (h, w) grid, whose
  columns [lo, hi) = ``acquired`` (default: all) were acquired (``Header.acquired``)."""
  s, c, hh, ww = kspace_shape
  h, w = recon_shape
  lo, hi = acquired or (0, ww)
  return _HEADER_XML.format(
      acquisition=acquisition, coils=c, H=hh, W=ww, h=h, w=w,
      H_mm=hh * _PIXEL_MM, W_mm=ww * _PIXEL_MM, h_mm=h * _PIXEL_MM, w_mm=w * _PIXEL_MM,
      W_max=hi - lo - 1, W_center=ww // 2 - lo, S_max=s - 1, S_center=s // 2).encode()


def write_volume(path, kspace, rss, *, acquisition="CORPD_FBK", patient_id="", attrs=None,
                 acquired=None):
  """Writes a fastMRI multi-coil file atomically (temporary name, then ``os.replace``).

  Args:
    path: destination ``.h5`` file.
    kspace: (S, C, H, W) complex k-space.
    rss: (S, h, w) real root-sum-of-squares reconstruction.
    acquisition, patient_id: fastMRI attrs.
    attrs: extra file attrs.
    acquired: the columns [lo, hi) of W the header says were acquired (None: all); the caller
      zeroes the others, as fastMRI's data has them.
  """
  path = Path(path)
  kspace = np.asarray(kspace)
  rss = np.asarray(rss)
  if kspace.ndim != 4 or not np.iscomplexobj(kspace):
    raise DataError(f"{path}: key '{KSPACE}': expected complex (slices, coils, H, W), "
                    f"found {kspace.dtype} {kspace.shape}")
  if rss.ndim != 3 or rss.shape[0] != kspace.shape[0] or np.iscomplexobj(rss):
    raise DataError(f"{path}: key '{RSS}': expected real ({kspace.shape[0]}, h, w), "
                    f"found {rss.dtype} {rss.shape}")
  with files.atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
    f.create_dataset(KSPACE, data=kspace.astype(np.complex64))
    f.create_dataset(RSS, data=rss.astype(np.float32))
    f.create_dataset(HEADER, data=np.bytes_(
        ismrmrd_header(kspace.shape, rss.shape[1:], acquisition=acquisition,
                       acquired=acquired)))
    f.attrs.update({"max": float(rss.max()), "norm": float(np.linalg.norm(kspace)),
                    "acquisition": acquisition, "patient_id": patient_id, **(attrs or {})})


def list_volumes(data_dir, split) -> list[Path]:
  """The sorted ``.h5`` files in ``data_dir/<split>`` or (fastMRI) ``data_dir/multicoil_<split>``.

  Splits are directories, so they are by file (subject), never by slice.
  """
  if split not in SPLITS:
    raise DataError(f"split: expected one of {SPLITS}, found {split!r}")
  candidates = [Path(data_dir) / split, Path(data_dir) / f"multicoil_{split}"]
  # Hidden files are not volumes: macOS leaves "._name.h5" (AppleDouble) beside each copied file.
  found_in = {d: sorted(f for f in d.glob("*.h5") if not f.name.startswith("."))
              for d in candidates}
  full = [d for d in candidates if found_in[d]]
  if len(full) > 1 and full[0].resolve() == full[1].resolve():  # One folder linked as both.
    full = full[:1]
  if len(full) > 1:
    raise DataError(f"{data_dir}: split '{split}' is in both {full[0]} and {full[1]}; expected "
                    "one of them (move or remove the other)")
  if full:
    files = found_in[full[0]]
    listed = set(files)
    ignored = [f for f in full[0].rglob("*") if f.suffix.lower() in (".h5", ".hdf5")
               and f not in listed and not f.name.startswith(".")]
    if ignored:
      logging.warning("%s: ignoring %d file(s) in sub-folders or not named *.h5 (e.g. %s): a "
                      "split's volumes are %s/*.h5", full[0], len(ignored), ignored[0], full[0])
    return files
  found = [f"{d} ({'empty of .h5 files' if d.is_dir() else 'missing'})" for d in candidates]
  hint = ""
  if any(Path(data_dir).glob("*.h5")):  # Pointed at a split folder itself?
    hint = (f" ({data_dir} holds .h5 files itself: --data_dir is the folder that holds the "
            f"split folders, e.g. {Path(data_dir).absolute().parent}?)")
  raise DataError(f"{data_dir}: expected fastMRI multi-coil .h5 files for split '{split}' in "
                  f"{' or '.join(str(d) for d in candidates)}; found {', '.join(found)}{hint}")


def _open(path) -> h5py.File:
  path = Path(path)
  if not path.is_file():
    what = ("a broken symbolic link" if path.is_symlink() and not path.exists() else
            "a directory" if path.is_dir() else "no such file")
    raise DataError(f"{path}: expected a fastMRI .h5 volume, found {what}")
  if path.stat().st_size == 0:
    raise DataError(f"{path}: expected an HDF5 file, found an empty one (0 bytes: still being "
                    "copied?)")
  if not h5py.is_hdf5(path):
    raise DataError(f"{path}: expected an HDF5 file, found another format")
  try:
    return h5py.File(path, "r")
  except OSError as e:  # A truncated download passes is_hdf5 (the signature is at the start).
    if "lock file" in str(e).lower():  # HDF5: "unable to lock file, errno = 11, ..."
      raise DataError(f"{path}: expected a readable HDF5 file, found it locked: open for writing "
                      "by another process, or on a filesystem without file locks (NFS, FUSE: "
                      f"set HDF5_USE_FILE_LOCKING=FALSE) ({e})") from e
    raise DataError(f"{path}: expected a readable HDF5 file, found a damaged or truncated one "
                    f"({e})") from e


def _kspace(f: h5py.File, path, undersampled: bool = False) -> tuple[h5py.Dataset, "Header"]:
  """The validated ``kspace`` dataset of an open file, and its header. Undersampled files
  (fastMRI test/challenge files) are refused unless ``undersampled`` (then they need a mask)."""
  if not isinstance(f.get(KSPACE), h5py.Dataset):
    raise DataError(f"{path}: expected a dataset '{KSPACE}', found keys {sorted(f.keys())}")
  ds = f[KSPACE]
  if ds.dtype.kind != "c":
    hint = (" (real and imaginary parts in a last axis of 2? store them as complex64)"
            if ds.dtype.kind == "f" and ds.ndim and ds.shape[-1] == 2 else "")
    raise DataError(f"{path}: key '{KSPACE}': expected a complex dtype, found {ds.dtype} "
                    f"{ds.shape}{hint}")
  if ds.ndim != 4 or 0 in ds.shape:
    hint = " (a single-coil file? multi-coil data is expected)" if ds.ndim == 3 else ""
    raise DataError(f"{path}: key '{KSPACE}': expected a non-empty 4-D (slices, coils, H, W) "
                    f"array, found shape {ds.shape}{hint}")
  header = read_header(f)
  _check_axes(ds.shape, header.encoded, path)
  marks = [m for m in UNDERSAMPLED_MARKS if m in f or m in f.attrs]
  if marks and undersampled:
    if not isinstance(f.get(MASK), h5py.Dataset) or f[MASK].shape not in ((ds.shape[3],),
                                                                          tuple(ds.shape[2:])):
      found = f"shape {f[MASK].shape}" if isinstance(f.get(MASK), h5py.Dataset) else "none"
      raise DataError(f"{path}: key '{MASK}': an undersampled file needs its sampling mask, "
                      f"(W,) = ({ds.shape[3]},) or (H, W) = {tuple(ds.shape[2:])}; found {found}")
  elif marks:
    where = ", ".join(f"key '{m}'" if m in f else f"attr '{m}'" for m in marks)
    raise DataError(f"{path}: {where}: a fastMRI test/challenge file (its k-space is already "
                    "undersampled and it has no fully sampled target); expected fully sampled "
                    "k-space (multicoil_train / multicoil_val files)")
  return ds, header


@dataclasses.dataclass(frozen=True)
class Header:
  """What the pipeline reads of a file's ISMRMRD header (None: absent or unreadable).

  ``encoded``: encodedSpace's matrix size (x, y), the (H, W) k-space is stored with.
  ``recon``: reconSpace's matrix size (x, y), fastMRI's reconstruction grid (320 x 320).
  ``acquired``: the columns [lo, hi) of W that were acquired, as fastMRI's loaders read them:
  ``lo = y // 2 - center``, ``hi = lo + maximum + 1`` from encodedSpace's y and encodingLimits'
  kspace_encoding_step_1; fastMRI zero-pads k-space outside them. None also when they do not
  fit inside the matrix.
  ``parsed``: whether a header was there and parsed as XML.
  """
  encoded: Optional[tuple[int, int]] = None
  recon: Optional[tuple[int, int]] = None
  acquired: Optional[tuple[int, int]] = None
  parsed: bool = False


def read_header(f: h5py.File) -> Header:
  """The :class:`Header` of an open file."""
  if not isinstance(f.get(HEADER), h5py.Dataset):
    return Header()
  try:
    raw = f[HEADER][()]
    raw = raw.item() if isinstance(raw, np.ndarray) and raw.size == 1 else raw
    raw = raw.encode() if isinstance(raw, str) else bytes(raw)
    root = ElementTree.fromstring(raw.strip(b"\0 \t\r\n"))  # Some writers pad with NULs.
  except (ElementTree.ParseError, TypeError, ValueError, OSError):
    return Header()
  encoded = _header_ints(root, "encodedSpace", "matrixSize", ("x", "y"))
  limits = _header_ints(root, "encodingLimits", "kspace_encoding_step_1", ("center", "maximum"))
  acquired = None
  if encoded and limits:
    lo = encoded[1] // 2 - limits[0]
    hi = lo + limits[1] + 1
    acquired = (lo, hi) if 0 <= lo < hi <= encoded[1] else None
  return Header(encoded=encoded, recon=_header_ints(root, "reconSpace", "matrixSize", ("x", "y")),
                acquired=acquired, parsed=True)


def _header_ints(root, outer: str, inner: str, keys) -> Optional[tuple[int, ...]]:
  """The integers ``keys`` of the header's first ``<outer><inner>`` element (namespace-free),
  e.g. encodedSpace/matrixSize (x, y); None when any is missing or not an integer."""
  tag = lambda el: el.tag.rsplit("}", 1)[-1]  # Without the ISMRMRD namespace.
  for el in root.iter():
    if tag(el) == outer:
      values = {tag(v): v.text for m in el if tag(m) == inner for v in m}
      try:
        return tuple(int(values[k]) for k in keys)
      except (KeyError, TypeError, ValueError):
        return None
  return None


def _check_axes(shape, matrix, path) -> None:
  """Refuses k-space whose axes are in another order than (slices, coils, H, W) where the
  header's encodedSpace ``matrix`` (H, W) says so: stored transposed, or with the coils last
  (without a header: more coils than rows and columns). Read as it is, such data would train on
  rotated or garbled images without any error. (``open_volume`` warns of other mismatches.)"""
  if matrix is None:  # No header to go by: only the one layout no real scan can have.
    if shape[1] > max(shape[2:]):
      raise DataError(f"{path}: key '{KSPACE}': expected (slices, coils, H, W), found shape "
                      f"{tuple(shape)}: more coils than k-space rows or columns (are the coils "
                      "the last axis? store them as axis 1)")
    return
  if tuple(shape[2:]) == matrix:
    return
  where = (f"{path}: key '{KSPACE}': expected (slices, coils, H, W) with (H, W) = {matrix}, the "
           f"readout and phase-encoding sizes of the header's encodedSpace ('{HEADER}'), found "
           f"shape {tuple(shape)}")
  if tuple(shape[2:]) == matrix[::-1]:
    raise DataError(f"{where}: the last two axes look swapped (store them as H, W)")
  if tuple(shape[1:3]) == matrix:
    raise DataError(f"{where}: the coils look like the last axis (store them as axis 1)")


def _plain(value):
  """An HDF5 attribute value as a plain Python value."""
  if isinstance(value, bytes):
    return value.decode(errors="replace")
  return value.item() if isinstance(value, np.generic) else value


def open_volume(path, undersampled: bool = False) -> VolumeInfo:
  """Validates a multi-coil volume file and returns its metadata (reads no k-space).

  Logs a warning when the file has a header that does not parse, or whose encodedSpace differs
  from the k-space's (H, W) in a way no axis permutation explains (then its acquired columns are
  not believed either)."""
  with _open(path) as f:
    ds, header = _kspace(f, path, undersampled)
    shape = tuple(ds.shape)
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    has_header = HEADER in f
  if has_header and not header.parsed:
    logging.warning("%s: key '%s': not an ISMRMRD XML header; the k-space axis order and its "
                    "acquired columns cannot be checked", path, HEADER)
  agrees = header.encoded == shape[2:]
  if header.encoded and not agrees:
    logging.warning("%s: the header's encodedSpace matrix %s differs from the k-space's (H, W) "
                    "%s; check the axis order (slices, coils, H, W)", path, header.encoded,
                    shape[2:])
  return VolumeInfo(path=Path(path), num_slices=shape[0], num_coils=shape[1],
                    kspace_shape=shape, attrs=attrs,
                    acquired=header.acquired if agrees else None, recon=header.recon)


def read_slice(path, index, undersampled: bool = False) -> np.ndarray:
  """The k-space of slice ``index``: (C, H, W) complex64, checked to be finite and small enough
  for float32 FFTs (``undersampled``: fastMRI test/challenge files are read too)."""
  with _open(path) as f:
    ds, _ = _kspace(f, path, undersampled)
    if not 0 <= index < ds.shape[0]:
      raise DataError(f"{path}: key '{KSPACE}': expected a slice index in [0, {ds.shape[0]}), "
                      f"found {index}")
    try:
      kspace = np.asarray(ds[index], np.complex64)
    except OSError as e:  # A damaged chunk or compression filter.
      raise DataError(f"{path}: key '{KSPACE}', slice {index}: expected readable data, found a "
                      f"damaged file ({e})") from e
  where = f"{path}: key '{KSPACE}', slice {index}"
  bad = np.size(kspace) - np.count_nonzero(np.isfinite(kspace))
  if bad:
    raise DataError(f"{where}: expected finite values, found {bad} NaN/Inf")
  # An orthonormal 2D FFT's output can reach sqrt(H * W) times the largest input magnitude.
  largest = float(np.abs(kspace).max())
  if largest > float(np.finfo(np.float32).max) / math.sqrt(kspace.shape[-1] * kspace.shape[-2]):
    raise DataError(
        f"{where}: its largest magnitude, {largest:.3g}, is so close to float32's maximum "
        f"({np.finfo(np.float32).max:.3g}) that the FFTs' sums overflow to inf (then LAPACK's "
        "'Eigenvalues did not converge', or NaN images); expected k-space scaled well below it "
        "(fastMRI's is ~1e-3): rescale the file's k-space")
  return kspace


def read_mask(path) -> Optional[np.ndarray]:
  """The sampling mask of an undersampled file (fastMRI test/challenge: key ``mask``) as
  (H, W) bool, or None for a fully sampled file. A (W,) mask of columns is broadcast over H."""
  with _open(path) as f:
    ds, _ = _kspace(f, path, undersampled=True)
    if MASK not in f:
      return None
    mask = np.asarray(f[MASK][()]).astype(bool)
    return np.broadcast_to(mask, ds.shape[2:]).copy()


def center_fit(x, shape):
  """Centre-crops (or zero-pads where smaller) the last two axes of ``x`` to ``shape``.

  Keeps the FFT centre (index n // 2) at the centre (index m // 2) of the output.
  """
  out = np.zeros(x.shape[:-2] + tuple(shape), x.dtype)
  common = np.minimum(x.shape[-2:], shape)
  src, dst = center_slices(x.shape[-2:], common), center_slices(shape, common)
  out[(..., *dst)] = x[(..., *src)]
  return out


def to_grid(kspace, size) -> np.ndarray:
  """Brings k-space (C, H, W) onto the (h, w) reconstruction grid: (C, h, w) complex64.

  The coil images are centre-cropped (zero-padded where smaller) to ``size`` (an int for a square
  grid, or (h, w)), which also removes readout oversampling, and transformed back.
  """
  size = (size, size) if isinstance(size, int) else tuple(size)
  return fft2c(center_fit(ifft2c(np.asarray(kspace)), size)).astype(np.complex64)
