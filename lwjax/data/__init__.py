"""The data pipeline: fastMRI files -> prepared slices -> splits -> batches.

Submodules:
  fastmri    the fastMRI multi-coil HDF5 format: writing, listing, validating, reading volumes
  synthetic  synthetic knee-like volumes, and a dataset of them in the fastMRI layout
  prepare    ``PrepConfig`` (from ``Config``), the run's mask, one slice's input and target
  cache      the prepared-slice cache on disk and the worker processes that fill it
  splits     ``Split``, ``load_split``, a split's identity record and disjointness
  volumes    volume patches of consecutive slices for 3D networks; the examples a network sees
  batching   training batches (``batch_order``, ``gather``) and evaluation batches

The names below are what the rest of lwjax uses; everything else lives in its submodule.
"""
from lwjax.data import fastmri, synthetic
from lwjax.data.batching import (batch_order, check_batch_size, eval_batches, gather,
                                 num_examples, steps_per_epoch)
from lwjax.data.cache import cache_key
from lwjax.data.prepare import (EmptySlice, PrepConfig, calib_size, calibration_warning,
                                checked_mask, mask_for, network_input, prep_config,
                                prepare_slice)
from lwjax.data.splits import (Split, acquired_acceleration, check_disjoint, data_difference,
                               data_record, format_span, grid_columns, load_split,
                               samples_outside_acquired, volume_infos)
from lwjax.data.synthetic import make_synthetic_dataset, synthetic_dataset
from lwjax.data.volumes import example_arrays, to_volumes, volume_patches

__all__ = [
    "fastmri", "synthetic",
    "batch_order", "check_batch_size", "eval_batches", "gather", "num_examples", "steps_per_epoch",
    "cache_key",
    "EmptySlice", "PrepConfig", "calib_size", "calibration_warning", "checked_mask", "mask_for",
    "network_input", "prep_config", "prepare_slice",
    "Split", "acquired_acceleration", "check_disjoint", "data_difference", "data_record",
    "format_span", "grid_columns", "load_split", "samples_outside_acquired", "volume_infos",
    "make_synthetic_dataset", "synthetic_dataset",
    "example_arrays", "to_volumes", "volume_patches",
]
