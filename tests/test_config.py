import subprocess
import sys

import pytest

from synthset.config import Config, apply_overrides, load_config, stage_hash
from conftest import ROOT


def test_defaults_and_yaml_files_validate():
    from synthset.sweep.spec import is_sweep_file, load_sweep, trial_configs

    Config()
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        trial_configs(load_sweep(path)) if is_sweep_file(path) else load_config(path)  # a sweep: every trial's config


def test_unknown_key_is_named_with_its_dotted_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("synthesis:\n  actors:\n    num_gpu: 1\n")
    with pytest.raises(ValueError, match=r"synthesis\.actors\.num_gpu: unknown key"):
        load_config(p)


@pytest.mark.parametrize("override, field", [
    ("synthesis.guidance_scale=-1", "synthesis.guidance_scale"),
    ("foundation.pretrain.prompt_dropout=1.5", "foundation.pretrain.prompt_dropout"),
    ("student.temperature=0", "student.temperature"),
    ("synthesis.actors.min=3", "synthesis.actors"),
    ("data.source=mnist", "data.source"),
    ("synthesis.prompt_template=a photo", "synthesis.prompt_template"),
])
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_set_overrides_parse_yaml_values():
    cfg = load_config(None, ["synthesis.guidance_scale=2.5", "student.labels=[soft]", "tracking.uri=null",
                             "run.name=x=y"])
    assert cfg.synthesis.guidance_scale == 2.5
    assert cfg.student.labels == ["soft"]
    assert cfg.tracking.uri is None
    assert cfg.run.name == "x=y"


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["synthesis.guidance_scale"])
    with pytest.raises(ValueError, match="is not a section"):
        apply_overrides({"run": {"name": "a"}}, ["run.name.x=1"])


def test_stage_hashes_follow_dependencies():
    base = load_config(None)
    student = load_config(None, ["student.epochs=3"])
    synth = load_config(None, ["synthesis.guidance_scale=5"])
    assert stage_hash(base, "teacher") == stage_hash(student, "teacher")
    assert stage_hash(base, "synthesis") == stage_hash(student, "synthesis")
    assert stage_hash(base, "student") != stage_hash(student, "student")
    assert stage_hash(base, "foundation") == stage_hash(synth, "foundation")
    assert stage_hash(base, "synthesis") != stage_hash(synth, "synthesis")
    assert stage_hash(base, "label") != stage_hash(synth, "label")
    assert stage_hash(base, "synthesis") == stage_hash(load_config(None), "synthesis")  # stable
    execution = load_config(None, ["synthesis.actors.max=4", "label.batch_size=9", "student.in_memory_bytes=5"])
    assert stage_hash(base, "synthesis") == stage_hash(execution, "synthesis")
    assert stage_hash(base, "label") == stage_hash(execution, "label")
    assert stage_hash(base, "student") == stage_hash(execution, "student")
    assert stage_hash(base, "synthesis") != stage_hash(load_config(None, ["synthesis.batch_size=7"]), "synthesis")


def test_bad_config_fails_fast_from_the_job_entrypoint(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("synthesis:\n  guidance_scale: 99\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(p)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert [x.name for x in tmp_path.iterdir()] == ["bad.yaml"]  # nothing was started (output.root is runs/…)
    assert "synthesis.guidance_scale" in proc.stderr


def test_dry_run_prints_resolved_config_and_does_no_work(tmp_path):
    root = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config",
                           str(ROOT / "conf" / "tiny.yaml"), "--set", f"output.root={root}", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "guidance_scale" in proc.stdout and "stage" not in proc.stderr
    assert not root.exists()


def test_extends_merges_sections_over_the_base_and_rejects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, seed: 3}\nsynthesis: {images_per_class: 7, batch_size: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun: {name: child}\nsynthesis: {method: loft}\n")
    cfg = load_config(tmp_path / "child.yaml", ["synthesis.batch_size=9"])
    assert (cfg.run.name, cfg.run.seed) == ("child", 3)
    assert (cfg.synthesis.method, cfg.synthesis.images_per_class, cfg.synthesis.batch_size) == ("loft", 7, 9)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml.*extended by"):
        load_config(tmp_path / "orphan.yaml")


def test_source_fields_at_their_defaults_keep_the_stage_hashes():
    """The own-data fields change a stage's hash only when set: existing runs stay reusable."""
    base = load_config(str(ROOT / "conf" / "quickstart.yaml"))
    same = load_config(str(ROOT / "conf" / "quickstart.yaml"), ["data.channels=1", "data.on_bad_image=error"])
    rgb = load_config(str(ROOT / "conf" / "quickstart.yaml"), ["data.channels=3"])
    for stage in ("foundation", "teacher", "synthesis"):
        assert stage_hash(same, stage) == stage_hash(base, stage)
        assert stage_hash(rgb, stage) != stage_hash(base, stage)


def test_replication_index_fields_change_hashes_only_with_faiss():
    """index: exact (the default) hashes as before the index existed, whatever the index_* fields say; index: faiss
    moves the gate's hash and everything after it, and its settings count (tiled_l2's only for tiled_l2)."""
    base = load_config(str(ROOT / "conf" / "quickstart.yaml"))
    d = base.to_dict()
    assert d["replication"]["index"] == "exact"
    exact = load_config(str(ROOT / "conf" / "quickstart.yaml"), ["replication.index_nprobe=4",
                                                                  "replication.index_candidates=8"])
    faiss = load_config(str(ROOT / "conf" / "quickstart.yaml"), ["replication.index=faiss"])
    faiss_k8 = load_config(str(ROOT / "conf" / "quickstart.yaml"), ["replication.index=faiss",
                                                                     "replication.index_candidates=8"])
    for stage in ("replication", "evaluate"):
        assert stage_hash(exact, stage) == stage_hash(base, stage)
        assert stage_hash(faiss, stage) != stage_hash(base, stage)
        assert stage_hash(faiss_k8, stage) != stage_hash(faiss, stage)
    assert stage_hash(faiss, "label") == stage_hash(base, "label")
    assert stage_hash(faiss, "student", extra="soft") == stage_hash(base, "student", extra="soft")  # action: flag
    cosine = ["replication.metric=cosine", "replication.index=faiss"]
    assert (stage_hash(load_config(None, cosine), "replication")
            == stage_hash(load_config(None, [*cosine, "replication.index_grid=4"]), "replication"))
    with pytest.raises(ValueError, match="replication.index_nprobe"):
        load_config(None, ["replication.index_nprobe=0"])
    with pytest.raises(ValueError, match="replication.index"):
        load_config(None, ["replication.index=hnsw"])


def test_privacy_config_reuses_the_quickstart_foundation():
    """conf/privacy.yaml loads the quickstart's pretrained model by path: the path must follow its recipe."""
    quickstart = load_config(ROOT / "conf" / "quickstart.yaml")
    privacy = load_config(ROOT / "conf" / "privacy.yaml")
    assert privacy.data.splits.public == quickstart.data.splits.public
    assert privacy.foundation.path == f"runs/quickstart/foundation/{stage_hash(quickstart, 'foundation')}/model"
