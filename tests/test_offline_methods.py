"""The offline catalogue end to end through the one loop, one method per family, on the quickstart's synthetic
review task: a tiny Llama after brief SFT (shared by the module) trains for a small budget and its held-out
preference accuracy rises from 50% (the starting model is the reference: every margin is 0). Also: BCO's carried
reward shift and TR-DPO's moving reference resume exactly, TR-DPO recomputes its reference values after each
update, `alignkit kto` trains from the command line, a dataset of the wrong shape is refused naming the field, and
`alignkit <method> --help` lists the method's options."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import (
    VOCABULARY,
    make_response,
    preference_records,
    sentiment_reward,
    sft_records,
)
from alignkit.errors import ConfigError, DataError
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop
from alignkit.train.logging import read_metrics
from alignkit.train.method import Method

TOKENIZER = build_word_tokenizer(VOCABULARY)
COMMON = dict(model="tiny", max_length=64, max_tokens_per_row=512, progress=False, seed=0, ref_cache=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and oversubscribes a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The starting model (tiny Llama after SFT on the task), the held-out pairs and the training data files."""
    root = tmp_path_factory.mktemp("offline_methods")
    write_jsonl_atomic(root / "sft.jsonl", sft_records(200, seed=0))
    model = build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=32, layers=2, heads=4)
    sft = TrainConfig(train_data=str(root / "sft.jsonl"), loss="sft", learning_rate=3e-3, warmup_steps=2,
                      max_tokens_per_batch=1024, output_dir=str(root / "sft"), **COMMON)
    model = loop.train(sft, model, TOKENIZER).model.eval()
    write_jsonl_atomic(root / "heldout.jsonl", preference_records(100, seed=2))
    heldout = prepare_examples(str(root / "heldout.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    data = {shape: str(root / f"{shape}.jsonl") for shape in DATASETS}
    pairs = preference_records(160, seed=1)
    for shape, make in DATASETS.items():
        write_jsonl_atomic(data[shape], make(pairs, random.Random(5)))
    return model, heldout, data, root


def unpaired(pairs, rng):
    """Each pair split into a desirable and an undesirable completion (thumbs up / down)."""
    return [record for r in pairs for record in ({"prompt": r["prompt"], "completion": r["chosen"], "label": 1},
                                                 {"prompt": r["prompt"], "completion": r["rejected"], "label": 0})]


def lists(pairs, rng):
    """Four responses per prompt graded by the task's reward."""
    out = []
    for r in pairs:
        responses = [r["chosen"], r["rejected"], *(make_response(rng, r["prompt"].split()[-2]) for _ in range(2))]
        out.append({"prompt": r["prompt"], "responses": responses, "scores": [sentiment_reward(x) for x in responses]})
    return out


def negatives(pairs, rng):
    """The rejected response as the labelled negative; three draws of the SFT data's distribution stand in for the
    starting model's own samples."""
    return [{"prompt": r["prompt"], "rejected": r["rejected"],
             "samples": [make_response(rng, r["prompt"].split()[-2]) for _ in range(3)]} for r in pairs]


def with_other_rewards(pairs, rng):
    """A second objective, 'mentions the topic', as precomputed rewards of each response (MODPO)."""
    def topic(r, side):
        return float(r["prompt"].split()[-2] in r[side].split())
    return [{**r, "other_rewards": {"chosen": [topic(r, "chosen")], "rejected": [topic(r, "rejected")]}} for r in pairs]


DATASETS = {"pairs": lambda pairs, rng: pairs, "unpaired": unpaired, "lists": lists, "negatives": negatives,
            "modpo": with_other_rewards}


def heldout_accuracy(model, start, heldout) -> float:
    """Share of held-out pairs whose log-ratio margin against the starting model is positive (ties half)."""
    batch = pack(heldout, max_tokens_per_row=4096)
    with torch.no_grad():
        now, before = response_logprobs(model.eval(), batch).seq_logps, response_logprobs(start, batch).seq_logps
    margins = (now[:, 0] - before[:, 0]) - (now[:, 1] - before[:, 1])
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


def method_config(task, name: str, data: str, loss: str, **values) -> TrainConfig:
    _, _, files, root = task
    settings = {**COMMON, "loss": loss, "learning_rate": 2e-3, "max_tokens_per_batch": 400, **values}
    return TrainConfig(train_data=files[data], output_dir=str(root / name), **settings)


FAMILIES = [  # (family, data file, loss, options, extra config)
    ("pairwise with reference (stateful BCO)", "pairs", "bco_pair", {}, {}),
    ("pairwise, moving reference (TR-DPO)", "pairs", "dpo", {}, {"ref_update": {"every": 4, "alpha": 0.5}}),
    ("reference-free", "pairs", "simpo", {}, {}),
    ("unpaired (KTO, KL from mismatched pairs)", "unpaired", "kto", {}, {}),
    ("unpaired (BCO)", "unpaired", "bco", {}, {}),
    ("listwise", "lists", "lipo", {}, {}),
    ("token level (token KL, activation masks)", "pairs", "sparsepo", {}, {}),
    ("negatives only", "negatives", "d2o", {}, {}),
    ("multi-objective", "modpo", "modpo", {}, {}),
]


@pytest.mark.parametrize("family, data, loss, options, extra", FAMILIES, ids=[f[2] + "-" + f[1] for f in FAMILIES])
def test_each_family_learns_heldout_preferences(task, family, data, loss, options, extra):
    start, heldout, _, root = task
    name = f"{loss}-{data}"
    cfg = method_config(task, name, data, loss, loss_options=options, **extra)
    result = loop.train(cfg, copy.deepcopy(start).train(), TOKENIZER)
    rows = read_metrics(root / name)
    assert len(rows) >= 8 and all(math.isfinite(r["loss"]) for r in rows)
    accuracy = heldout_accuracy(result.model, start, heldout)
    assert accuracy >= 0.7, f"{family}: held-out preference accuracy {accuracy:.2f} (0.5 before training)"
    last = rows[-1]
    if loss == "kto":  # z0 from the mismatched pairs: 0 while the policy is the reference, never negative
        assert rows[0]["kto/kl"] == pytest.approx(0.0, abs=1e-5) and all(r["kto/kl"] >= 0 for r in rows)
    if loss in ("bco", "bco_pair"):  # the shift counts every batch (bco_pair) or reward (bco) seen so far
        counts = [r["bco/reward_shift_count"] for r in rows]
        assert counts == sorted(counts) and counts[-1] == (len(rows) if loss == "bco_pair" else 320)
    if loss == "sparsepo":
        assert 0 < last["sparsepo/mask_mean"] < 1  # activation masks weight some tokens less than others


# ---- carried state and moving reference: exact resume ----


class Interrupt(Exception):
    pass


def interrupt_at_step(monkeypatch, step: int) -> None:
    real, calls = Method.forward, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Interrupt(f"stopped in step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(Method, "forward", counting)


RESUMED = {"bco_pair": ("pairs", "bco_pair", {}), "trdpo": ("pairs", "dpo", {"ref_update": {"every": 2, "alpha": 0.5}}),
           "bco": ("unpaired", "bco", {})}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resume_restores_loss_state_and_reference_exactly(task, tmp_path, monkeypatch, name):
    start = task[0]
    data, loss, extra = RESUMED[name]
    settings = dict(max_steps=5, save_every=2, keep_last=1, max_tokens_per_batch=200, **extra)

    def config(out):
        return method_config(task, str(tmp_path / out), data, loss, **settings)

    straight = loop.train(config("straight"), copy.deepcopy(start).train(), TOKENIZER)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5)  # steps 1-4 done; the checkpoint of step 4 is kept
        with pytest.raises(Interrupt):
            loop.train(config("resumed"), copy.deepcopy(start).train(), TOKENIZER)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert ("loss_state" in state) == (loss != "dpo")
    has_reference = (tmp_path / "resumed" / "checkpoints" / "step-00000004" / "reference" / "model.safetensors").exists()
    assert has_reference == ("ref_update" in extra)
    resumed = loop.train(config("resumed"), copy.deepcopy(start).train(), TOKENIZER)

    def values(out):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(tmp_path / out)]

    assert values("resumed") == values("straight")
    for key, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key


def test_state_is_updated_in_training_only(task, tmp_path):
    start = task[0]
    plain = method_config(task, str(tmp_path / "plain"), "pairs", "bco_pair", max_steps=4)
    evaluated = method_config(task, str(tmp_path / "eval"), "pairs", "bco_pair", max_steps=4, eval_every=1,
                              eval_data=task[2]["pairs"])
    loop.train(plain, copy.deepcopy(start).train(), TOKENIZER)
    loop.train(evaluated, copy.deepcopy(start).train(), TOKENIZER)
    shifts = [[r["bco/reward_shift"] for r in read_metrics(tmp_path / out)] for out in ("plain", "eval")]
    assert shifts[0] == shifts[1]


def test_trdpo_hard_update_recomputes_the_reference(task, tmp_path, monkeypatch):
    start = task[0]
    scored = []
    real = loop.score_references

    def recording(*args, **kwargs):
        refs = real(*args, **kwargs)
        scored.append((kwargs.get("use_cache"), refs[0].seq_logps.clone()))
        return refs

    monkeypatch.setattr(loop, "score_references", recording)
    cfg = method_config(task, str(tmp_path / "hard"), "pairs", "dpo", max_steps=5, max_tokens_per_batch=200,
                        ref_update={"mode": "hard", "every": 2})
    loop.train(cfg, copy.deepcopy(start).train(), TOKENIZER)
    rows = read_metrics(tmp_path / "hard")
    # after the hard updates of steps 2 and 4 the reference is the policy: the next step's DPO loss is log 2
    assert [r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in rows] == [True, False, True, False, True]
    assert [use_cache for use_cache, _ in scored] == [None, False, False]  # the disk cache is never used again
    assert not torch.equal(scored[0][1], scored[1][1]) and not torch.equal(scored[1][1], scored[2][1])


# ---- the command line ----


def test_alignkit_kto_trains_from_the_command_line(task, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    start, _, files, _ = task
    start.save_pretrained(tmp_path / "model")
    TOKENIZER.save_pretrained(tmp_path / "model")
    values = {**COMMON, "model": str(tmp_path / "model"), "train_data": files["unpaired"], "max_steps": 3,
              "max_tokens_per_batch": 200, "output_dir": str(tmp_path / "kto"), "learning_rate": 2e-3}
    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(values))
    assert main(["kto", "--config", str(tmp_path / "kto.yaml"), "--beta", "0.2", "--desirable_weight", "1.2"]) == 0
    rows = read_metrics(tmp_path / "kto")
    assert len(rows) == 3 and "kto/kl" in rows[0] and (tmp_path / "kto" / "final" / "config.json").exists()
    assert json.loads((tmp_path / "kto" / "config.json").read_text())["loss_options"] == {
        "beta": 0.2, "desirable_weight": 1.2}


@pytest.mark.parametrize("method, options", [
    ("kto", ["--beta", "--desirable_weight", "--undesirable_weight", "--use_kl_estimate"]),
    ("bco", ["--beta"]),
    ("modpo", ["--beta", "--weight", "--other_weights", "--hinge"]),
    ("sparsepo", ["--beta", "--use_token_kl", "--l1_weight", "--kl_l1_weight", "--token_weights"]),
    ("d2o", ["--beta", "--alpha", "data: negatives"]),
    ("dpo", ["--ref_update.mode", "--ref_update.every", "--ref_update.alpha"]),
])
def test_help_lists_every_option(capsys, method, options):
    assert main([method, "--help"]) == 0
    text = capsys.readouterr().out
    for option in [*options, "--learning_rate", "--ref_update"]:
        assert option in text, option


# ---- refusals ----


@pytest.mark.parametrize("loss, data, field", [
    ("lipo", "pairs", "responses"),
    ("kto", "pairs", "completion"),
    ("d2o", "pairs", "samples"),
    ("d2o", "unpaired", "rejected"),
    ("dpo", "unpaired", "chosen"),
    ("modpo", "pairs", "other_rewards"),
])
def test_wrong_shape_data_is_refused_naming_the_field(task, tmp_path, loss, data, field):
    cfg = method_config(task, str(tmp_path / "wrong"), data, loss, max_steps=1)
    with pytest.raises(DataError) as err:
        loop.train(cfg, copy.deepcopy(task[0]), TOKENIZER)
    assert err.value.field == field and err.value.row == 1 and f"'{field}'" in str(err.value)
    assert not (tmp_path / "wrong" / "final").exists()


def test_impossible_reference_settings_are_refused(task, tmp_path):
    with pytest.raises(ConfigError, match="no reference model to update"):
        loop.train(method_config(task, str(tmp_path / "a"), "pairs", "simpo", ref_update={"every": 2}),
                   copy.deepcopy(task[0]), TOKENIZER)
    with pytest.raises(ConfigError, match="lora"):
        loop.train(method_config(task, str(tmp_path / "b"), "pairs", "dpo", ref_update={"every": 2}, lora={"r": 2}),
                   copy.deepcopy(task[0]), TOKENIZER)
