"""Refactors keep outputs: every stage hash of every config in conf/ and the prepared shards' bytes are pinned.

``tests/data/stage_hashes.json`` and ``tests/data/prepared_shards.json`` were recorded at 195bc68, before the
streaming prepare stage. A change that moves a hash or a byte fails here; the note that changes them on
purpose says which and why, and records the new values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import ROOT
from synthset.config import STAGE_INPUTS, load_config, stage_hash

PINNED = json.loads((ROOT / "tests" / "data" / "stage_hashes.json").read_text())
SHARDS = json.loads((ROOT / "tests" / "data" / "prepared_shards.json").read_text())


def _hashes(cfg) -> dict:
    from synthset.stages.caption import caption_dir
    from synthset.stages.privacy import shadow_dir

    h = {stage: stage_hash(cfg, stage) for stage in STAGE_INPUTS}
    h.update({f"student-{l}": stage_hash(cfg, "student", extra=l) for l in ("soft", "hard")})
    h.update({f"caption-{s}": caption_dir(cfg, s).hash for s in ("private", "public")})
    h["privacy-classifier"] = shadow_dir(cfg, cfg.privacy, "classifier").hash
    return h


def test_every_config_in_conf_is_pinned():
    configs = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        raw = path.read_text()
        if "\nbase:" in raw or raw.startswith("base:") or "sweep" in path.name:
            continue  # sweep specs: their trials are configs of the files they name
        configs.append(str(path.relative_to(ROOT)))
    assert sorted(PINNED) == configs


@pytest.mark.parametrize("name", sorted(PINNED))
def test_stage_hashes_are_unchanged(name):
    assert _hashes(load_config(ROOT / name)) == PINNED[name]


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("name", sorted(SHARDS))
def test_prepared_shards_are_byte_identical(name, tmp_path):
    from synthset.stages.prepare import prepare_dir, run_prepare

    cfg = load_config(ROOT / name, [f"output.root={tmp_path}", "tracking.enabled=false"])
    run_prepare(cfg)
    stage = prepare_dir(cfg)
    assert stage.hash == SHARDS[name]["prepare"]
    root = Path(stage.uri)
    written = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(root.rglob("*")) if p.is_file() and (p.suffix == ".tar" or p.name == "splits.json")}
    assert written == SHARDS[name]["files"]
