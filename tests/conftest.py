"""Shared fixtures: tiny configs and models that build in seconds on CPU."""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import synthset.methods  # noqa: E402,F401  (registers the built-in methods a config may name)
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


def assert_close_scaled(actual, expected, *, rtol: float = 1e-4, scale_atol: float = 1e-5, msg=None) -> None:
    """``torch.testing.assert_close`` with ``atol = scale_atol · max|expected|`` (tensors or arrays).

    float32 results of the same maths in another order (batched vs per-sample GEMMs, chunked sums,
    another CPU's kernels) differ by rounding relative to the magnitudes summed, not to each element:
    an element near zero can be off by ~1e-6 · max|x|, which a fixed atol (1e-6) or a purely
    relative test rejects on an unlucky machine. The defaults suit one float32 forward pass (seen:
    ≤ 2e-6 · max|x|); a wrong LoRA or a 1 % scale error moves most elements by ≥ 1e-3 · max|x|.
    """
    import torch

    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=scale_atol * scale, msg=msg)


def assert_adam_close(actual, expected, *, lr: float, steps: int, rtol: float = 1e-4, scale_atol: float = 1e-5,
                      max_outliers: float = 0.01, label: str = "") -> None:
    """Parameters trained by Adam(W) for ``steps`` steps (peak ``lr``) from one start on gradients that
    differ only by float32 rounding (bank vs solo, chunked vs whole step, gloo all-reduce vs one process).

    ``actual``/``expected``: tensors or equal-length sequences of tensors (e.g. every LoRA factor of a
    bank), compared elementwise with ``rtol`` and ``scale_atol · max|expected|`` per tensor. Adam steps
    by m̂/(√v̂ + ε), ε = 1e-8: an element whose gradient sits at the rounding floor can move anywhere in
    ±lr on one side and not the other, so however correct the code a few elements (seen: ≤ 0.15 %)
    differ by up to lr per step — at most 2·lr·steps in all (|m̂/√v̂| ≤ 1.01 for the first few steps,
    by Cauchy-Schwarz over the moment averages). Hence: at most ``max_outliers`` of all elements
    outside the rounding tolerance and none beyond that bound. A real bug (another LoRA's samples, a
    loss weight or lr off by 1 %) moves most elements of the LoRA it touches and fails.
    Not a uniform gradient scale, which Adam (and clipping to a norm) removes: compare the gradients
    too (``lora_step_gradients``).
    """
    import torch

    if isinstance(actual, torch.Tensor) or not isinstance(actual, (list, tuple)):
        actual, expected = [actual], [expected]
    if len(actual) != len(expected):
        raise ValueError(f"assert_adam_close: {len(actual)} tensors vs {len(expected)}")
    outliers = total = 0
    worst = 0.0
    for a, e in zip(actual, expected):
        a, e = torch.as_tensor(a).double(), torch.as_tensor(e).double()
        assert a.shape == e.shape, (label, tuple(a.shape), tuple(e.shape))
        diff = (a - e).abs()
        tol = rtol * e.abs() + scale_atol * float(e.abs().max())
        outliers += int((diff > tol).sum())
        total += e.numel()
        worst = max(worst, float(diff.max()))
    assert outliers <= max_outliers * total, f"{label}: {outliers}/{total} elements differ beyond rounding"
    assert worst <= 2 * lr * steps, f"{label}: an element differs by {worst:.3g} > 2·lr·steps = {2 * lr * steps:.3g}"


@contextlib.contextmanager
def lora_step_gradients():
    """Yields a list that receives, for every step of every ``train_lora_bank`` call in the block, the LoRA
    gradients [A, B of each layer] as the step computed them: chunks accumulated and ranks all-reduced,
    before per-LoRA clipping and AdamW.

    ``assert_adam_close`` cannot see a gradient off by one uniform factor (a loss weight on the backward
    pass only, an all-reduce that averages instead of summing): Adam's m̂/(√v̂ + ε) and clipping to a
    norm both remove the scale (only ε = 1e-8 betrays it, on elements whose gradient is not far above
    ε). Comparing these gradients does. Compare the first step's: every run starts from the same
    parameters there.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from synthset.lora import train

    steps, clipped = [], []
    real_clip = train.clip_grad_norm_per_lora_

    def grads(params):
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    def clip_spy(layers, max_norm):
        steps.append(grads([p for layer in layers for p in (layer.lora_A, layer.lora_B)]))
        clipped.append(True)
        return real_clip(layers, max_norm)

    def before_step(optimizer, args, kwargs):
        if not clipped:  # no clipping this step: AdamW receives the raw gradient
            steps.append(grads([p for group in optimizer.param_groups for p in group["params"]]))
        clipped.clear()

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "clip_grad_norm_per_lora_", clip_spy)
            yield steps
    finally:
        handle.remove()


def have_fashion_mnist() -> bool:
    from synthset.data.sources import DEBIAN_DIR

    return Path(DEBIAN_DIR, "train-images-idx3-ubyte.gz").exists()


def require(condition: bool, reason: str) -> None:
    """Skip the calling test (or module) when an input it needs is missing — the Fashion-MNIST package,
    the KubeRay CRDs, a dependency — but fail it under CI (the environment variable ``CI`` set, as
    ``.ci/run`` does): there a missing input is a broken environment, and a skip would let the suite go
    green without the tests that need it."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: required inputs may not be skipped)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_import(name: str):
    """``pytest.importorskip`` through ``require``: the module, or a skip (a failure under CI)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"could not import {name!r}: {e}")


@pytest.fixture
def fashion_mnist():
    """Use (``pytest.mark.usefixtures("fashion_mnist")``) in tests that read the real Fashion-MNIST."""
    require(have_fashion_mnist(), "dataset-fashion-mnist not installed")


def unet_inputs(unet, n: int, seed: int = 0):
    """Seeded (latents, timesteps, 16-token text states) for ``n`` samples of a UNet2DConditionModel."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = torch.randn(n, 16, c.cross_attention_dim, generator=g)
    return x, t, cond


def randomize_lora_b(layers, seed: int = 1) -> None:
    """Give LoRA bank layers non-zero B factors (fresh banks are the identity)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


@pytest.fixture
def s3_server(monkeypatch):
    """An S3-compatible server (moto) on loopback with a bucket ``synthset``; AWS_* env points at it. Yields a
    boto3 client of it."""
    boto3 = require_import("boto3")
    server_mod = require_import("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # moto keeps its buckets in process-wide state, shared by every server of this process: start empty (an
    # earlier test's objects under the same keys made a later test find its output complete before it ran).
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="synthset")
    yield boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    server.stop()


@pytest.fixture(autouse=True)
def _tracking_uri_not_inherited():
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; a later test's subprocess (the sweep driver)
    would inherit it and track into this test's store. Restore the variable after every test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
