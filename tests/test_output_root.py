"""A stage writes only below ``output.root`` (``stages/common.py`` StageDir, ``storage.is_within``)."""

import pytest

from synthset import storage
from synthset.stages.common import StageDir, output_root


@pytest.mark.parametrize("root,uri,inside", [
    ("/runs/a", "/runs/a", True),
    ("/runs/a", "/runs/a/teacher/123", True),
    ("/runs/a", "/runs/a/../b/teacher", False),
    ("/runs/a", "/runs/ab/teacher", False),          # a sibling sharing the prefix is outside
    ("/runs/a", "/etc/passwd", False),
    ("/runs/a", "file:///runs/a/x", True),
    ("s3://bucket/run", "s3://bucket/run/synthesis/1", True),
    ("s3://bucket/run", "s3://bucket/run/../other", False),
    ("s3://bucket/run", "s3://other-bucket/run/x", False),
    ("s3://bucket/run", "gs://bucket/run/x", False),
    ("s3://bucket/run", "/local/run/x", False),
])
def test_is_within(root, uri, inside):
    assert storage.is_within(root, uri) is inside


def test_stage_dirs_of_a_config_lie_under_its_root(tiny_config):
    root = output_root(tiny_config)
    stage = StageDir.for_config(tiny_config, "teacher")
    assert stage.uri.startswith(root + "/teacher/") and storage.is_within(root, stage.path("model", "x.json"))


def test_a_stage_directory_that_climbs_out_of_the_root_is_rejected(tiny_config):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        StageDir.for_config(tiny_config, "student", extra="../../../escaped")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        StageDir("caption", "h", storage.join(output_root(tiny_config), "..", "..", "caption", "h"))


def test_an_absolute_stage_directory_is_rejected_before_anything_is_written(tiny_config, tmp_path):
    outside = tmp_path / "elsewhere" / "teacher" / "abc"
    stage = StageDir("teacher", "abc", str(outside))
    with pytest.raises(ValueError, match=r"outside output\.root.*refusing to write"):
        stage.begin(tiny_config)
    assert not outside.exists()


@pytest.mark.parametrize("part", ["../../etc/passwd", "/etc/passwd", "~/x", "s3://bucket/x", "a/../../b"])
def test_a_file_name_that_leaves_the_stage_directory_is_rejected(tiny_config, part):
    stage = StageDir.for_config(tiny_config, "teacher")
    with pytest.raises(ValueError, match="refusing to write outside it"):
        stage.path("model", part)


def test_remote_roots_are_checked_the_same_way(tiny_config):
    from synthset.config import load_config
    from conftest import ROOT

    cfg = load_config(ROOT / "conf" / "tiny.yaml", ["output.root=s3://bucket/run"])
    assert StageDir.for_config(cfg, "synthesis").uri.startswith("s3://bucket/run/synthesis/")
    with pytest.raises(ValueError, match="outside output.root"):
        StageDir("synthesis", "h", "s3://other-bucket/run/synthesis/h").check_within(cfg)
    with pytest.raises(ValueError, match=r"'\.\.'"):
        StageDir.for_config(cfg, "student", extra="../../synthesis")
