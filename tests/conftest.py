"""Test set-up shared by every test module.

Eight simulated CPU devices (set before jax is imported anywhere) so sharding is tested for real.
Tests that want one device pass an explicit one-device mesh.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the app's caches (its compiled executables) go to a folder of this test run, not the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mixtral-chat-tests-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

from fake_hub import cache_dir, hub, repo_folder  # noqa: E402,F401  (fixtures for every test module)
from tiny_model import tiny_ckpt, tiny_hf  # noqa: E402,F401
