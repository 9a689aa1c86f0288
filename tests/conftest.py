"""Test set-up: several simulated CPU devices, so that data parallelism is exercised."""
import os

# Must happen before JAX is imported anywhere: 4 host devices let the tests compare 1 and N devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
