"""MLflow credentials come only from the environment (``tracking.py``, ``config.uri_credentials``)."""

import os

import pytest

from conftest import ROOT
from synthset.config import Config, load_config
from synthset.tracking import tracking_uri

TINY = ROOT / "conf" / "tiny.yaml"


@pytest.mark.parametrize("uri,secret", [("https://user:pass@mlflow.example.com", "user:pass"),
                                        ("http://alice:s3cret@10.0.0.5:5000", "s3cret"),
                                        ("https://ghp_tok123@mlflow.example.com", "ghp_tok123"),
                                        ("https://mlflow.example.com/?token=abc987", "abc987")])
def test_a_tracking_uri_with_credentials_is_rejected_naming_the_env_vars(uri, secret):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [f"tracking.uri={uri}"])
    message = str(err.value)
    assert "tracking.uri" in message and "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert secret not in message  # the error (printed, logged) does not repeat the secret


@pytest.mark.parametrize("uri", ["s3://AKIAXXXX:wJalrXUtn@bucket/run", "s3://bucket/run?access_key=A&secret_key=B"])
def test_an_output_root_with_credentials_is_rejected(uri):
    with pytest.raises(ValueError, match="output.root.*AWS_ACCESS_KEY_ID"):
        load_config(TINY, [f"output.root={uri}"])


def test_plain_uris_are_accepted():
    cfg = load_config(TINY, ["tracking.uri=https://mlflow.example.com:5000", "output.root=s3://bucket/run?region=eu-west-1"])
    assert cfg.tracking.uri == "https://mlflow.example.com:5000"


def test_no_config_field_holds_a_secret():
    """Passwords and tokens have no place in the config model: nothing to fill in, nothing to leak."""
    def fields(model, prefix=""):
        for name, info in model.model_fields.items():
            yield prefix + name
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from fields(annotation, prefix + name + ".")

    names = list(fields(Config))
    assert "tracking.uri" in names and "data.caption.captioner" in names
    secret_words = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey"}
    bad = [n for n in names if secret_words & set(n.rsplit(".", 1)[-1].split("_")) or "access_key" in n]
    assert not bad, bad


def test_the_uri_comes_from_the_environment_when_the_config_has_none(tmp_path, monkeypatch):
    cfg = load_config(TINY, [f"output.root={tmp_path}"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")
    assert tracking_uri(cfg) == "http://mlflow.mlflow.svc:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter2@mlflow.example.com")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD") as err:
        tracking_uri(cfg)
    assert "hunter2" not in str(err.value)
    remote = load_config(TINY, ["output.root=s3://bucket/run"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        tracking_uri(remote)


def test_a_second_config_in_the_same_process_gets_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the next config must not inherit the first's store
    (a sweep test's subprocess once tracked into an earlier test's database)."""
    from synthset.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config(TINY, [f"output.root={tmp_path / 'a'}"])
    second = load_config(TINY, [f"output.root={tmp_path / 'b'}"])
    assert Tracker(first).uri == f"sqlite:///{tmp_path / 'a'}/mlflow.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'a'}/mlflow.db"  # MLflow's own export
    assert Tracker(second).uri == f"sqlite:///{tmp_path / 'b'}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")  # the user's: still wins
    assert tracking_uri(second) == "http://mlflow.mlflow.svc:5000"
