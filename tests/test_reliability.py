"""Nothing leaks, escapes or is left half-done (issue 28): one test per input the reliability audit found failing.

Each test names the row of docs/reliability.md it keeps; each failed on the code before it (195bc68).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from synthset.config import Config, load_config
from synthset.data.prepare import plan_prepare


def _folder(root, classes=("cat", "dog"), per_class=10, size=12):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c + 3 * i, 90, 200 - 20 * c)).save(root / name / f"{i:03d}.png")
    return root


def _cfg(tmp_path, folder, **data):
    return Config.model_validate({"output": {"root": str(tmp_path / "runs")}, "tracking": {"enabled": False},
                                  "data": {"source": "image_folder", "path": str(folder), "channels": 3,
                                           "image_size": 16, "splits": {"public": 0, "private": 10}, **data},
                                  "foundation": {"arch": {"image_size": 16}}})


def test_a_directory_link_loop_is_an_error_naming_it(tmp_path):
    folder = _folder(tmp_path / "pets")
    os.symlink(folder / "cat", folder / "cat" / "loop")
    with pytest.raises(ValueError, match=r"cat/loop is a directory link that loops back"):
        plan_prepare(_cfg(tmp_path, folder).data)


def test_a_file_reached_twice_is_counted_once(tmp_path):
    folder = _folder(tmp_path / "pets")
    os.symlink(folder / "cat" / "000.png", folder / "cat" / "zzz-again.png")  # a second path to one file
    from synthset.data.sources import open_source

    keys = open_source(_cfg(tmp_path, folder).data).listing("train").keys
    assert len(keys) == 20 and "cat/zzz-again.png" not in keys and len(set(keys)) == len(keys)


def test_links_leaving_data_path_need_follow_links_outside(tmp_path):
    folder = _folder(tmp_path / "pets")
    outside = _folder(tmp_path / "elsewhere", classes=("bird",))
    os.symlink(outside / "bird", folder / "bird")
    with pytest.raises(ValueError, match=r"pets/bird is a link to .*elsewhere/bird, outside .*follow_links_outside"):
        plan_prepare(_cfg(tmp_path, folder).data)
    plan = plan_prepare(_cfg(tmp_path, folder, follow_links_outside=True, splits={"public": 0, "private": 12}).data)
    assert plan.class_names == ["bird", "cat", "dog"]


def test_a_fifo_is_never_opened_and_a_non_utf8_name_and_a_link_loop_are_named(tmp_path):
    folder = _folder(tmp_path / "pets")
    os.mkfifo(folder / "cat" / "pipe.png")
    os.symlink(folder / "cat" / "self.png", folder / "cat" / "self.png")  # a file link loop
    bad_name = os.fsencode(folder / "dog") + b"/caf\xe9.png"
    Image.new("RGB", (12, 12)).save(bad_name.decode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"cat/pipe\.png: not a regular file"):
        plan_prepare(_cfg(tmp_path, folder).data)
    plan = plan_prepare(_cfg(tmp_path, folder, on_bad_image="skip").data)
    reasons = {s.name.rsplit("/", 1)[-1]: s.reason for s in plan.skipped}
    assert reasons["pipe.png"].startswith("not a regular file")
    assert reasons["caf\\xe9.png"].startswith("its file name is not valid UTF-8")
    assert "Too many levels of symbolic links" in reasons["self.png"]


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    from synthset.data.images import BadImage, pixel_cap, read_image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb)  # a few KB on disk, 169 Mpx declared
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadImage, match=r"declares 13000×13000 = 169,000,000 pixels, over the cap"):
        read_image(bomb, str(bomb), 3, 32, max_pixels=pixel_cap(32))
    assert pixel_cap(32) == 4096 * 4096 and pixel_cap(1024) == 64 * 1024 * 1024


def test_tar_members_are_capped_and_their_names_made_keys(tmp_path, monkeypatch):
    from synthset.data import webdataset_source
    from synthset.data.webdataset_source import WebDatasetSource

    def png(seed):
        import io
        buf = io.BytesIO()
        Image.new("L", (8, 8), seed).save(buf, format="PNG")
        return buf.getvalue()

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("../../evil.png", png(1)), ("../../evil.cls", b"0"),
                           ("/abs/x.png", png(2)), ("/abs/x.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    listed = WebDatasetSource(str(shard), class_names=["a", "b"]).listing("train")
    assert listed.keys == ["s.tar/evil", "s.tar/abs/x"]
    monkeypatch.setattr(webdataset_source, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ValueError, match=r"over the 10 bytes read for one image"):
        WebDatasetSource(str(shard), class_names=["a", "b"]).load("train")


def test_a_class_whose_images_all_fall_in_the_test_set_says_what_fixes_it(tmp_path):
    from synthset.data.splits import in_test_set

    folder = _folder(tmp_path / "pets")
    (folder / "zebra").mkdir()
    name = next(f"{i:04d}.png" for i in range(1000) if in_test_set(np.array([f"zebra/{i:04d}.png"]), 0.2)[0])
    Image.new("RGB", (12, 12)).save(folder / "zebra" / name)
    with pytest.raises(ValueError, match=r"'zebra' \(1 test image\(s\)\): every image of them falls in the test set"):
        plan_prepare(_cfg(tmp_path, folder).data)


@pytest.mark.parametrize("root", ["/", "/usr", os.path.expanduser("~"), "s3://bucket"])
def test_an_output_root_that_is_not_a_directory_of_its_own_is_refused(root):
    with pytest.raises(ValueError, match=r"output\.root: .*(system or home directory|whole bucket)"):
        load_config(None, [f"output.root={root}"])
    with pytest.raises(ValueError, match=r"privacy\.export_to"):
        load_config(None, [f"privacy.export_to={root}"])


def test_a_link_inside_the_output_root_cannot_lead_writes_out(tmp_path):
    from synthset.stages.prepare import run_prepare

    folder, outside = _folder(tmp_path / "pets"), tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink(outside, tmp_path / "runs" / "prepare")
    with pytest.raises(ValueError, match=r"leads to .*outside/\w+ through a symbolic link, outside output\.root"):
        run_prepare(_cfg(tmp_path, folder))
    assert list(outside.iterdir()) == []


def test_a_stage_being_redone_is_not_complete_while_it_runs(tiny_config):
    from synthset.stages.common import StageDir

    stage = StageDir.for_config(tiny_config, "synthesis")
    stage.begin(tiny_config)
    stage.complete({"dataset": "x"})
    assert stage.is_complete()
    stage.begin(tiny_config)  # --no-resume: a kill right after this leaves no complete-looking empty stage
    assert not stage.is_complete()


def test_one_writer_per_stage_and_a_dead_runs_lease_is_taken_over(tiny_config):
    from synthset import storage
    from synthset.stages import common
    from synthset.stages.common import LEASE, StageBusy, StageDir

    stage = StageDir.for_config(tiny_config, "label")
    storage.makedirs(stage.uri)
    storage.write_json(stage.path(LEASE), {"owner": "other-host:123:abcd", "heartbeat": time.time()})
    with pytest.raises(StageBusy, match=r"being written by another run \(other-host:123:abcd"):
        stage.begin(tiny_config)
    storage.write_json(stage.path(LEASE), {"owner": "other-host:123:abcd", "heartbeat": time.time() - 600})
    stage.begin(tiny_config)  # the other run died ten minutes ago: taken over
    assert storage.read_json(stage.path(LEASE))["owner"] == common._TOKEN
    stage.complete({})
    assert not storage.exists(stage.path(LEASE))
    # A run of this host killed a moment ago (its heartbeat fresh, its process gone): taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{os.uname().nodename}:{dead.pid}:abcd"
    storage.write_json(stage.path(LEASE), {"owner": owner, "heartbeat": time.time()})
    stage.begin(tiny_config)
    assert storage.read_json(stage.path(LEASE))["owner"] == common._TOKEN
    stage.complete({})
    # ...but not one whose process is alive (this one, under another token).
    storage.write_json(stage.path(LEASE), {"owner": f"{os.uname().nodename}:{os.getpid()}:abcd",
                                           "heartbeat": time.time()})
    with pytest.raises(StageBusy):
        stage.begin(tiny_config)


def test_two_processes_cannot_both_write_a_stage(tmp_path):
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'platform')!r})\n"
              "from synthset.config import load_config\nfrom synthset.stages.common import StageDir\n"
              f"cfg = load_config({str(ROOT / 'conf' / 'tiny.yaml')!r}, ['output.root={tmp_path}'])\n"
              "StageDir.for_config(cfg, 'teacher').begin(cfg)\nprint('began', flush=True)\ntime.sleep(30)\n")
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "began"
        second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "being written by another run" in second.stderr
    finally:
        first.kill()


@pytest.mark.parametrize("override", ["privacy.export_to=s3://bucket/out?secret_key=hunter2",
                                      "synthesis.casd.pool.path=s3://KEY:hunter2@bucket/pool",
                                      "data.path=https://user:hunter2@example.com/data",
                                      "foundation.path=https://hf.co/x?token=hunter2"])
def test_credentials_in_any_path_field_are_refused_without_echo(override):
    with pytest.raises(ValueError) as err:
        load_config(None, [override, "data.source=image_folder"] if override.startswith("data.path")
                    else [override])
    message = str(err.value)
    assert override.split("=", 1)[0] in message and "credentials are not allowed" in message
    assert "hunter2" not in message


def test_a_dry_run_with_a_secret_prints_neither_the_secret_nor_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config",
                             str(ROOT / "conf" / "casd.yaml"), "--dry-run", "--set", f"output.root={tmp_path}",
                             "--set", "synthesis.casd.pool.path=s3://KEY:hunter2@bucket/pool"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "synthesis.casd.pool.path" in result.stderr


def test_mlflow_artifacts_stay_under_the_output_root(tmp_path, monkeypatch):
    import mlflow

    from synthset.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # where ./mlruns would have gone
    cfg = load_config(ROOT / "conf" / "tiny.yaml", [f"output.root={tmp_path / 'runs'}", "tracking.experiment=t"])
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracker = Tracker(cfg)
    with tracker.pipeline_run("job"):
        tracker.log_stage("stage", cfg, artifacts=[str(note)])
    assert mlflow.get_experiment_by_name("t").artifact_location.startswith(f"file://{tmp_path / 'runs'}/")
    assert list((tmp_path / "runs" / "mlartifacts").rglob("note.txt")) and not (tmp_path / "mlruns").exists()


def test_a_bad_folder_fails_before_ray_or_mlflow_start(tmp_path):
    folder = _folder(tmp_path / "pets")
    os.symlink(folder / "dog", folder / "dog" / "again")
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config",
                             str(ROOT / "conf" / "own_data.yaml"), "--set", f"data.path={folder}",
                             "--set", f"output.root={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "dog/again is a directory link that loops back" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    print(f"error after {time.monotonic() - t0:.1f}s")  # docs/reliability.md records it (import time included)


def test_a_relative_output_root_means_the_same_place_in_every_worker(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directories: a relative root read there named another
    place, and the quickstart's foundation worker prepared the data again under /tmp/ray/session_*/artifacts."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "conf" / "tiny.yaml", ["output.root=runs/here"])
    assert cfg.output.root == str(tmp_path / "runs" / "here")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Config.model_validate(cfg.to_dict()).output.root == str(tmp_path / "runs" / "here")
    assert load_config(None, ["output.root=s3://bucket/run"]).output.root == "s3://bucket/run"
