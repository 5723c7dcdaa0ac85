"""benchmarks/method_quality.py's named rows (--variant): parsed strictly, never shadowing a built-in."""

import importlib.util

import pytest
from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("method_quality", ROOT / "benchmarks" / "method_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_spec_gives_name_and_overrides():
    mq = _module()
    assert mq.parse_variant("dm:synthesis.casd.variant=dm") == ("dm", ["synthesis.casd.variant=dm"])
    assert mq.parse_variant(" mis : synthesis.casd.pool.mismatch=other_classes  run.name=x") == (
        "mis", ["synthesis.casd.pool.mismatch=other_classes", "run.name=x"])


@pytest.mark.parametrize("spec", ["dm", "dm:", ":a=b", "dm:synthesis.casd.variant"])
def test_malformed_variant_spec_is_refused_with_the_spec(spec):
    with pytest.raises(SystemExit, match="--variant"):
        _module().parse_variant(spec)
