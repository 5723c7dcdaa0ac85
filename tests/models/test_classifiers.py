import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from synthset.config import ClassifierConfig, DataConfig
from synthset.data.splits import fit_images, make_splits, to_unit_tensor
from synthset.eval.classification import classification_report, confusion_matrix
from synthset.models.classifiers import build_classifier, load_classifier, save_classifier
from synthset.models.training import array_batches, distillation_loss, fit_classifier, predict_proba


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_save_load_round_trip_is_exact(tmp_path, arch):
    cfg = ClassifierConfig(arch=arch, width=8)
    model = build_classifier(cfg, 10).eval()
    x = torch.randn(4, 1, 32, 32)
    save_classifier(model, tmp_path, cfg, 10, 1)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.pt"))
    torch.testing.assert_close(load_classifier(tmp_path)(x), model(x))


def test_distillation_loss_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    logits_equal = torch.log(p)  # student already matches the teacher → loss 0 at any temperature
    # KL sums t²·target·(log target − log q) over terms of size t²·|log q| ≈ 6; float32 logs carry a few
    # 1e-7 relative each, so the loss is exact to ~3e-6 absolute (not relative to a small KL); wrong
    # temperature handling or a missing t² is off by ≥ 1e-2.
    assert distillation_loss(logits_equal, p, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    z = torch.tensor([[1.0, 0.0, 0.0]])
    t = 2.0
    target = F.softmax(torch.log(p) / t, -1)
    q = F.softmax(z / t, -1)
    expected = (target * (target.log() - q.log())).sum() * t ** 2
    assert distillation_loss(z, p, t).item() == pytest.approx(expected.item(), abs=1e-5)  # KL ≈ 0.069: as above


def test_confusion_and_report():
    labels = np.array([0, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 2]]
    cm = confusion_matrix(labels, probs.argmax(1), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    rep = classification_report(labels, probs, ["a", "b", "c"])
    assert rep["accuracy"] == 0.75 and rep["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 1.0}


def test_cnn_learns_digits(tmp_path):
    splits = make_splits(DataConfig(source="digits", image_size=16, splits={"public": 0, "private": 1200}))
    x = to_unit_tensor(fit_images(splits.private.images, 16))
    y = torch.from_numpy(splits.private.labels)
    cfg = ClassifierConfig(width=8, epochs=6, lr=5e-3)
    model = build_classifier(cfg, 10)
    fit_classifier(model, lambda e: array_batches(x, y, 64, 0, e), cfg.epochs, (len(x) + 63) // 64, cfg.lr,
                   cfg.weight_decay, soft=False, temperature=1.0, augment=False, seed=0)
    probs = predict_proba(model, to_unit_tensor(fit_images(splits.test.images, 16)))
    assert (probs.argmax(1) == splits.test.labels).mean() > 0.8
    # It trains in channels_last and hands the model back in NCHW, so safetensors can save it.
    assert all(p.is_contiguous() for p in model.parameters())
    save_classifier(model, tmp_path, cfg, 10, 1)


def test_input_blur_is_part_of_the_model_and_survives_save_and_load(tmp_path):
    from synthset.models.classifiers import InputBlur

    cfg = ClassifierConfig(arch="cnn", width=8, input_blur=1.0)
    model = build_classifier(cfg, 10).eval()
    assert isinstance(model, InputBlur)
    # The kernel sums to one and pads with the edge: a constant image passes unchanged (float32 sums of 7 taps).
    flat = torch.full((2, 1, 32, 32), 0.3)
    torch.testing.assert_close(model.blur(flat), flat, rtol=0, atol=1e-6)
    # A ±1 checkerboard (the highest frequency) is removed almost entirely at σ = 1: its gain there is
    # (Σ_k (-1)^k g_k)² ≈ 0.0167 per pixel in 2-D, so |x| drops from 1 to ~0.02; no blur keeps 1.
    i = torch.arange(32)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 1, 32, 32)
    inner = model.blur(checker)[..., 8:24, 8:24].abs().max().item()
    assert inner < 0.05
    # Training and test go through the same filter: the logits are the backbone's on the blurred input.
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(model(x), model.model(model.blur(x)))
    save_classifier(model, tmp_path, cfg, 10, 1)
    assert "kernel" not in " ".join(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "model.safetensors")))
    torch.testing.assert_close(load_classifier(tmp_path)(x), model(x))


def test_input_blur_enters_the_student_hash_only_when_set():
    from synthset.config import load_config, stage_hash

    conf = ROOT / "conf" / "tiny.yaml"  # no input_blur: the hashes' default
    base = load_config(conf)
    assert base.teacher.input_blur is None and base.student.input_blur is None
    blurred = load_config(conf, ["student.input_blur=1.0"])
    assert stage_hash(blurred, "student") != stage_hash(base, "student")
    assert stage_hash(blurred, "teacher") == stage_hash(base, "teacher")
    assert stage_hash(load_config(conf, ["teacher.input_blur=0.5"]), "teacher") != stage_hash(base, "teacher")
