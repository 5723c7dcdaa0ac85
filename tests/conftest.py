"""Shared fixtures: tiny configs and models that build in seconds on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from synthset.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS thread for a module of small-tensor tests: more threads only add
    contention on a shared CPU (up to 60x slower small matmuls seen here)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config(tmp_path):
    """``conf/tiny.yaml`` writing under a temporary directory."""
    return load_config(ROOT / "conf" / "tiny.yaml", [f"output.root={tmp_path / 'runs'}"])


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """An untrained tiny foundation pipeline saved with save_pretrained (session-cached)."""
    from synthset.config import load_config
    from synthset.models.foundation import build_foundation

    cfg = load_config(ROOT / "conf" / "tiny.yaml")
    path = tmp_path_factory.mktemp("foundation") / "model"
    build_foundation(cfg.foundation.arch, seed=0).save_pretrained(path, safe_serialization=True)
    return path


def have_fashion_mnist() -> bool:
    from synthset.data.sources import DEBIAN_DIR

    return Path(DEBIAN_DIR, "train-images-idx3-ubyte.gz").exists()
