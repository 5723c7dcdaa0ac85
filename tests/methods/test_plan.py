from synthset.methods.class_prompt import plan_requests
from synthset.methods.plan import derive_seed, shard_ranges

NAMES = ["t-shirt", "trouser", "bag"]


def test_plan_is_deterministic_and_prefixes_are_plans():
    full = plan_requests(0, 30, 7, NAMES, "a photo of a {class}")
    assert full == plan_requests(0, 30, 7, NAMES, "a photo of a {class}")
    assert full[:12] == plan_requests(0, 12, 7, NAMES, "a photo of a {class}")
    assert full[12:20] == plan_requests(12, 20, 7, NAMES, "a photo of a {class}")
    assert [r["class_id"] for r in full[:6]] == [0, 1, 2, 0, 1, 2]
    assert full[1]["prompt"] == "a photo of a trouser"
    assert len({r["key"] for r in full}) == 30 and len({r["seed"] for r in full}) == 30


def test_seeds_depend_on_run_seed_and_index():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert derive_seed(0, 5) != derive_seed(1, 5) and derive_seed(0, 5) != derive_seed(0, 6)
    assert 0 <= derive_seed(123, 456) < 2 ** 63


def test_shard_ranges_cover_everything_once():
    ranges = shard_ranges(25, 10)
    assert ranges == [(0, 0, 10), (1, 10, 20), (2, 20, 25)]
    assert shard_ranges(0, 10) == []
