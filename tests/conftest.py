"""Test set-up shared by every test module.

Eight simulated CPU devices (set before jax is imported anywhere) so sharding is tested for real.
Tests that want one device pass an explicit one-device mesh.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tiny_model import tiny_ckpt, tiny_hf  # noqa: E402,F401  (session fixtures for every test module)
