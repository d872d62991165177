"""report_to: the same metric names and steps in every backend, the config as parameters, a run name; wandb in
offline mode writing its run folder, mlflow with a local file store; every saved model with a model card and
training_state.json."""

from __future__ import annotations

import json

import pytest

from alignkit.config import TrainConfig
from alignkit.errors import ConfigError
from alignkit.train.logging import MetricsLog, read_metrics
from alignkit.train.trackers import flatten


def config(tmp_path, **overrides):
    return TrainConfig(**{"model": "tiny", "train_data": "x.jsonl", "output_dir": str(tmp_path), "progress": False,
                          **overrides})


def log_three(tmp_path, cfg):
    log = MetricsLog(tmp_path, 3, 0, progress=False, cfg=cfg)
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0 / step, "rewards/accuracy": 0.5 + step / 10})
    log.close()


def test_mlflow_file_store_gets_the_metrics_params_and_run_name(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path, report_to=["jsonl", "mlflow"], run_name="my-dpo", loss="dpo", loss_options={"beta": 0.3})
    log_three(tmp_path, cfg)
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "alignkit"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "my-dpo"
    assert run.data.params["loss_options.beta"] == "0.3" and run.data.params["model"] == "tiny"
    rows = read_metrics(tmp_path)  # jsonl is always written; mlflow holds exactly its values
    for key in ("loss", "rewards/accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in rows]


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    __import__("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, report_to=["jsonl", "wandb"], run_name="my-run")
    log_three(tmp_path, cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the run file (protobuf records, which `wandb sync` uploads) holds the run name, the config and the metric names;
    # wandb's service process writes it, so on a loaded machine the last records can land just after finish()
    import time

    deadline = time.monotonic() + 20
    while True:
        data = next(runs[0].glob("*.wandb")).read_bytes()
        if all(t in data for t in (b"my-run", b"rewards/accuracy", b"learning_rate")) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for text in (b"my-run", b"rewards/accuracy", b"loss", b"learning_rate"):
        assert text in data, text
    for row in read_metrics(tmp_path):  # each logged value, as the JSON wandb stores it
        for key in ("loss", "rewards/accuracy"):
            assert json.dumps(row[key]).encode() in data, (key, row[key])


def test_a_missing_backend_names_its_package(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLog(tmp_path, 1, 0, progress=False, cfg=config(tmp_path, report_to=["wandb"]))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": [1], "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": [1], "f": {}}


def test_model_card_and_training_state(tmp_path):
    from alignkit.train.model_card import training_state, write_model_card

    cfg = config(tmp_path, loss="dpo", loss_options={"beta": 0.2},
                 train_data={"path": "trl-lib/ultrafeedback_binarized", "split": "train"})
    final = tmp_path / "final"
    final.mkdir()
    write_model_card(final, training_state(cfg, {"loss": 0.5, "rewards/accuracy": 0.75}, steps=12))
    state = __import__("json").loads((final / "training_state.json").read_text())
    assert state["base_model"] == "tiny" and state["loss_options"] == {"beta": 0.2} and state["steps"] == 12
    assert "ultrafeedback_binarized" in state["data"]["train_data"] and state["alignkit_version"]
    card = (final / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny") and "| `beta` | `0.2` |" in card
    assert "| `rewards/accuracy` | 0.75 |" in card and "ultrafeedback_binarized" in card
