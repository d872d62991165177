"""Rollout workers on Ray (online/ray_rollouts.py, `ray: {rollout_workers: N}`), on one local Ray of 2 CPUs: a
synchronous run on two workers equals the one-process run (metrics, rollouts, final weights); async rollouts on Ray
keep the staleness bound and equal the one-process async run; a worker killed mid-round is restarted, its chunk
redone, and the run's numbers do not change; a run stopped after a checkpoint resumes on Ray to the straight run's
weights; what Ray refuses, by name."""

from __future__ import annotations

import copy
import logging
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.errors import ConfigError
from alignkit.models.tiny import build_tiny_model
from alignkit.online import OnlineInputs, online_config, ray_rollouts, run_online
from alignkit.online.config import method_loss
from alignkit.online.producer import sampling_version
from alignkit.train.distributed import Dist
from alignkit.train.logging import read_metrics
from synthetic_task import SENTIMENT, prompts
from test_online_guarantees import (
    assert_matches_one_process,
    crash_in_round,
    rollout_lines,
    values,
    without_timing,
    write_environment_config,
    write_environment_run,
    write_online_config,
)

ray = pytest.importorskip("ray")
placement_group_table = pytest.importorskip("ray.util").placement_group_table
pytestmark = pytest.mark.usefixtures("one_thread", "local_ray")
TWO_WORKERS = {"rollout_workers": 2}


@pytest.fixture(scope="module")
def local_ray():
    """One Ray for the module (a start costs seconds); the workers inherit the one-thread environment."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def run(task, out, ray_options=None, staleness=None, **overrides):
    """The tests' online run: 8 prompts a round in chunks of 4 (sampling.batch_size), so two workers share it."""
    extra = {"async": {"max_staleness": staleness}} if staleness is not None else {}
    if ray_options is not None:
        extra["ray"] = ray_options
    cfg = online_config(values("grpo", out, **{"rounds": 3, "sampling": {"batch_size": 4}, **extra, **overrides}))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=31), prompts(8, seed=32), SENTIMENT))


def assert_same_run(ours, theirs, out, expected_out, strip=()):
    rows = [{k: v for k, v in row.items() if k not in strip} for row in ours.rounds]
    assert without_timing(rows) == without_timing([{k: v for k, v in r.items() if k not in strip}
                                                   for r in theirs.rounds])
    assert rollout_lines(out) == rollout_lines(expected_out)
    for name, tensor in theirs.model.state_dict().items():
        assert torch.allclose(ours.model.state_dict()[name], tensor, atol=1e-5, rtol=0), name
    assert ours.summary["reward_final"] == theirs.summary["reward_final"]


@pytest.fixture(scope="module")
def one_process(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    return run(task, out, epochs=2), out


def spy_on_workers(monkeypatch) -> list:
    """Every RayEngine the runs make; each records the worker index of every chunk it submits (engine.chunks) and
    the most chunks it had in flight at once (engine.most_in_flight)."""
    engines = []
    real_init, real_submit, real_result = (ray_rollouts.RayEngine.__init__, ray_rollouts.RayEngine._submit,
                                           ray_rollouts.RayEngine._result)

    def init(self, *args):
        real_init(self, *args)
        self.chunks, self.in_flight, self.most_in_flight = [], 0, 0
        engines.append(self)

    def submit(self, index, *args):
        self.chunks.append(index)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return real_submit(self, index, *args)

    def result(self, *args):
        self.in_flight -= 1
        return real_result(self, *args)

    monkeypatch.setattr(ray_rollouts.RayEngine, "__init__", init)
    monkeypatch.setattr(ray_rollouts.RayEngine, "_submit", submit)
    monkeypatch.setattr(ray_rollouts.RayEngine, "_result", result)
    return engines


@pytest.mark.slow
def test_synchronous_run_on_two_workers_equals_one_process(task, tmp_path, one_process, monkeypatch):
    engines = spy_on_workers(monkeypatch)
    result = run(task, tmp_path, TWO_WORKERS, epochs=2)
    assert_same_run(result, one_process[0], tmp_path, one_process[1])
    engine, = engines
    assert engine.name == "fast" and engine.version == 3 and engine.redone == 0
    # each round's 8 prompts and the evaluations' 8 went out as two chunks of 4, one to each worker
    assert engine.chunks == [0, 1] * (1 + 3 + 1)


def exit_worker(worker_self):
    """Runs inside a rollout worker (sent by value): its process dies as a crash would."""
    os._exit(1)


@pytest.mark.slow
def test_lora_on_two_workers_equals_one_process(task, tmp_path, monkeypatch):
    """A LoRA policy: the workers hold the adapted model, only the adapters travel each push, and the run is one
    process's."""
    lora = dict(lora={"r": 4, "alpha": 8, "save": "adapter"}, learning_rate=5e-3)
    straight = run(task, tmp_path / "one", **lora)
    pushed = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: pushed.append(value) or real_put(value, **kw))
    result = run(task, tmp_path / "ray", TWO_WORKERS, **lora)
    assert_same_run(result, straight, tmp_path / "ray", tmp_path / "one")
    weights = [value for value in pushed if isinstance(value, dict)]
    assert len(weights) == 3 and all(names and all("lora_" in n for n in names) for names in map(list, weights))


@pytest.mark.slow
def test_a_worker_killed_mid_round_is_restarted_and_its_chunk_redone(task, tmp_path, one_process, monkeypatch):
    """Worker 1 dies in round 2, with its chunk queued behind the death: Ray restarts it, the chunk is redone with
    the round's weights (version 1; the restart rebuilt the worker at version 0), and the run equals one process."""
    engines, real_submit = spy_on_workers(monkeypatch), ray_rollouts.RayEngine._submit
    pids = []

    def submit(self, index, *args):
        if index == 1 and self.version == 1 and not pids:
            pids.append(ray.get(self.workers[1].describe.remote())[2])
            self.workers[1].__ray_call__.remote(exit_worker)
        if index == 1 and self.version == 2 and len(pids) == 1:
            pids.append(ray.get(self.workers[1].describe.remote())[2])
        return real_submit(self, index, *args)

    monkeypatch.setattr(ray_rollouts.RayEngine, "_submit", submit)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = run(task, tmp_path, {**TWO_WORKERS, "max_restarts": 1}, epochs=2)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert engines[0].redone == 1 and pids[0] != pids[1]
    assert_same_run(result, one_process[0], tmp_path, one_process[1])


@pytest.mark.slow
def test_async_rollouts_on_ray_keep_the_bound_and_equal_one_process(task, tmp_path, monkeypatch):
    """max_staleness 1: round r is sampled by the workers at weight version max(0, r - 1) (the version each chunk
    carried, which a worker holds or loads before sampling), and the run equals the one-process async run."""
    staleness, rounds = 1, 4
    straight = run(task, tmp_path / "one", staleness=staleness, rounds=rounds, eval_before_after=False)
    real_submit, versions = ray_rollouts.RayEngine._submit, []
    monkeypatch.setattr(ray_rollouts.RayEngine, "_submit",
                        lambda self, *args: versions.append(self.version) or real_submit(self, *args))
    result = run(task, tmp_path / "ray", TWO_WORKERS, staleness=staleness, rounds=rounds, eval_before_after=False)
    assert [row["staleness"] for row in result.rounds] == [min(r, staleness) for r in range(rounds)]
    # two chunks per round, in round order: each at its scheduled version, never more than N behind
    assert versions == [sampling_version(r, staleness) for r in range(rounds) for _ in range(2)]
    assert all(row["sampled_version"] >= row["weight_version"] - staleness for row in result.rounds)
    assert without_timing(result.rounds) == without_timing(straight.rounds)
    assert rollout_lines(tmp_path / "ray") == rollout_lines(tmp_path / "one")
    for name, tensor in straight.model.state_dict().items():
        assert torch.allclose(result.model.state_dict()[name], tensor, atol=1e-5, rtol=0), name


@pytest.mark.slow
def test_partial_rollouts_on_ray_equal_one_process(task, tmp_path):
    """max_staleness 2 with partial rollouts: each segment's generate call is split over the workers, which hold
    the segment's version; the run equals the one-process partial run."""
    common = {"rounds": 4, "eval_before_after": False, "async": {"max_staleness": 2, "partial": True}}
    straight = run(task, tmp_path / "one", **common)
    result = run(task, tmp_path / "ray", TWO_WORKERS, **common)
    assert [row["token_staleness"] < row["staleness"] for row in result.rounds[2:]] == [True, True]
    assert_same_run(result, straight, tmp_path / "ray", tmp_path / "one")


@pytest.mark.slow
def test_a_run_stopped_after_a_checkpoint_resumes_on_ray_exactly(task, tmp_path, one_process):
    """Stopped in round 3 (checkpoints after rounds 1 and 2), resumed on Ray (`ray` may change on a resume): the
    workers start from the checkpoint's weights, and the metrics, rollouts and final weights are the uninterrupted
    run's."""
    common = dict(epochs=2, save_every=1, keep_last=5)
    crash_in_round(3, lambda: run(task, tmp_path, **common))
    resumed = run(task, tmp_path, TWO_WORKERS, **common)
    assert [row["round"] for row in resumed.rounds] == [3]
    assert without_timing(read_metrics(tmp_path)) == without_timing(read_metrics(one_process[1]))
    assert rollout_lines(tmp_path) == rollout_lines(one_process[1])
    final, expected = (load_file(out / "final" / "model.safetensors") for out in (tmp_path, one_process[1]))
    assert all(torch.allclose(final[k], expected[k], atol=1e-5, rtol=0) for k in expected)
    assert resumed.summary["reward_start"] == one_process[0].summary["reward_start"]  # the checkpoint's


@pytest.mark.slow
@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
def test_environment_rollouts_on_ray_from_the_command_line_equal_one_process(tmp_path, monkeypatch, partial):
    """PPO on conversations of 1 to 3 turns (envs_support's Parity, stepped in the driver): `--ray.rollout_workers 2`
    on the command line; a turn's generate calls (chunks of 3 conversations) are all started before the first is
    waited for, so both workers sample at once; the conversations, the metrics and the final weights are one
    process's. Also with partial rollouts (max_staleness 2: each round's turns in two segments, two versions)."""
    engines = spy_on_workers(monkeypatch)
    write_environment_run(tmp_path)
    common = dict(rounds=4 if partial else 2, save_every=0, environment="envs_support:Parity",
                  max_tokens_per_batch=100, sampling={"max_new_tokens": 8, "engine": "fast", "batch_size": 3},
                  **({"async": {"max_staleness": 2, "partial": True}} if partial else {}))
    assert main(["online", "--config", write_environment_config(tmp_path, "single", **common)]) == 0
    assert main(["online", "--config", write_environment_config(tmp_path, "ray", **common),
                 "--ray.rollout_workers", "2"]) == 0
    assert rollout_lines(tmp_path / "ray") == rollout_lines(tmp_path / "single")
    theirs = without_timing(read_metrics(tmp_path / "single"))
    assert without_timing(read_metrics(tmp_path / "ray")) == theirs and any(r["turns"] > 1 for r in theirs)
    assert engines[0].most_in_flight == 4 and set(engines[0].chunks) == {0, 1}  # 12 conversations, chunks of 3
    if partial:
        assert theirs[3]["token_staleness"] < theirs[3]["staleness"] == 2  # round 4's later turns: version 1
    final, expected = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("ray", "single"))
    assert all(torch.allclose(final[k], expected[k], atol=1e-5, rtol=0) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [None, {"max_staleness": 1}, {"max_staleness": 2, "partial": True}],
                         ids=["sync", "async", "partial"])
def test_a_learner_group_of_two_ray_ranks_equals_one_process(task, tmp_path, caplog, asynchronous):
    """`--ray.learners 2 --ray.rollout_workers 1`: two Ray actors form a gloo group and run the torchrun ranks' DDP
    step, each sampling its 4 of a round's 8 prompts on a rollout worker of its own; the rollouts are one process's,
    the losses and the final weights to 1e-5 (as tests/test_online_guarantees.py checks torchrun's). (With
    rollout_workers 0 each rank samples itself, which is torchrun's path.) Async too (max_staleness 1): each rank's
    producer thread drives its worker and exchanges the shares on a group of its own."""
    workers = 1
    copy.deepcopy(task.model).save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    common = dict(rounds=3, prompts_per_round=8, epochs=1, minibatches=2, save_every=0, max_tokens_per_batch=200,
                  sampling={"batch_size": 2}, **({"async": asynchronous} if asynchronous else {}))
    assert main(["online", "--config", write_online_config(tmp_path, task, "single", **common)]) == 0
    groups_before = set(placement_group_table())
    with caplog.at_level(logging.INFO, logger="alignkit.online"):
        assert main(["online", "--config", write_online_config(tmp_path, task, "ray", **common), "--ray.learners",
                     "2", "--ray.rollout_workers", str(workers), "--ray.num_cpus_per_learner", "0.5",
                     "--ray.num_cpus_per_worker", "0.5"]) == 0  # four bundles in 2 CPUs
    ranks = next(r.args[1] for r in caplog.records if r.getMessage().startswith("learner group"))
    assert len(set(ranks)) == 2 and os.getpid() not in ranks  # two rank processes, neither the driver
    # the learners' group of two bundles, and each rank's own group of rollout workers
    groups = [group for key, group in placement_group_table().items() if key not in groups_before]
    assert sorted(len(group["bundles"]) for group in groups) == [1] * 2 * workers + [2]
    n = asynchronous["max_staleness"] if asynchronous else 0
    assert [row.get("staleness", 0) for row in read_metrics(tmp_path / "ray")] == [min(r, n) for r in range(3)]
    assert_matches_one_process(tmp_path / "ray", tmp_path / "single")


@pytest.mark.slow
def test_on_policy_cross_tokenizer_distillation_in_a_ray_learner_group_equals_one_process(task, tmp_path):
    """`alignkit distill --loss uld --lmbda 1 --teacher_tokenizer own --ray.learners 2`: each rank samples its half
    of a round on a rollout worker of its own, re-tokenises it for the teacher (its own BPE tokenizer) and takes the ULD distances inside the module
    DDP wraps, as under torchrun (tests/test_distill_ddp.py); rollouts, per-round loss and gradient norm, and final
    weights equal one process's."""
    import yaml

    from test_distill_ddp import online_values, save_bpe_teacher

    for name, model in (("student", task.model), ("teacher", task.model)):
        model.save_pretrained(tmp_path / name)
        task.tokenizer.save_pretrained(tmp_path / name)
    save_bpe_teacher(tmp_path / "bpe_teacher")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(24, seed=31)])
    command, values = online_values(tmp_path)["uld_online"]
    for name in ("single", "ray"):
        config = {"model": str(tmp_path / "student"), "output_dir": str(tmp_path / name), "progress": False,
                  **values}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    assert main([command, "--config", str(tmp_path / "single.yaml")]) == 0
    assert main([command, "--config", str(tmp_path / "ray.yaml"), "--ray.learners", "2", "--ray.rollout_workers", "1",
                 "--ray.num_cpus_per_learner", "0.5", "--ray.num_cpus_per_worker", "0.5"]) == 0
    assert_matches_one_process(tmp_path / "ray", tmp_path / "single")


# ---- refusals ----


@pytest.mark.parametrize("bad, key", [
    (dict(sampling={"engine": "hf"}), "sampling.engine"),
    (dict(sampling={"engine": "vllm"}, ray={"num_gpus_per_worker": 0}), "ray.num_gpus_per_worker"),
    (dict(ray={"rollout_workers": 0}), "ray.rollout_workers"),
    (dict(ray={"placement": "NEAR"}), "ray.placement"),
    (dict(ray={"workers": 2}), "ray.workers"),
    (dict(ray={"rollout_workers": 0}), "ray.rollout_workers"),
    (dict(ray={"learners": 2}, distributed="fsdp"), "distributed"),
])
def test_ray_refusals_name_the_key(tmp_path, bad, key):
    settings = {"ray": {}, **bad}
    with pytest.raises(ConfigError) as err:
        method_loss(online_config(values("grpo", tmp_path, **settings)))
    assert err.value.key == key


def test_ray_under_torchrun_and_a_cluster_too_small_are_refused_by_name(tmp_path):
    cfg = online_config(values("grpo", tmp_path, ray={"rollout_workers": 3, "placement_timeout_s": 2}))
    with pytest.raises(ConfigError) as err, ray_rollouts.RolloutCluster.open(cfg, Dist(world_size=2)):
        pass
    assert err.value.key == "ray"
    with pytest.raises(ConfigError) as err, ray_rollouts.RolloutCluster.open(cfg, Dist()):  # 3 workers, 2 CPUs
        pass
    assert err.value.key == "ray.rollout_workers" and "ray status" in str(err.value)
    assert ray.available_resources().get("CPU") == 2  # the refused placement group was removed


@pytest.mark.slow
def test_a_worker_past_its_restarts_stops_the_run_naming_max_restarts(task, tmp_path):
    cfg = online_config(values("grpo", tmp_path, ray={"max_restarts": 0}, sampling={"batch_size": 4}))
    with ray_rollouts.RolloutCluster.open(cfg, Dist()) as cluster:
        engine = cluster.engine(copy.deepcopy(task.model), task.tokenizer, cfg.sampling)
        ray.kill(engine.workers[0], no_restart=True)
        with pytest.raises(RuntimeError, match="max_restarts 0"):
            engine.generate([[1, 2, 3]], cfg.sampling, 2)


@pytest.mark.parametrize("engine", ["auto", "fast"])
def test_a_model_the_fast_engine_cannot_run_is_refused_before_workers_start(task, tmp_path, engine):
    cfg = online_config(values("grpo", tmp_path, ray={}, sampling={"engine": engine}))
    with ray_rollouts.RolloutCluster.open(cfg, Dist()) as cluster:
        with pytest.raises(ConfigError, match="needs vllm") as err:
            cluster.engine(build_tiny_model("gpt2", len(task.tokenizer)), task.tokenizer, cfg.sampling)
        assert err.value.key == "sampling.engine" and cluster.workers == []
