"""TRL configs run as they are: TRL's CLI / TrainingArguments / script keys mapped onto alignkit's (the mapping
printed once), batch sizes converted by the stated rule, keys with no meaning named in one error, and a TRL DPO YAML
training the tiny model on a local dataset folder end to end."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import yaml

from alignkit.api import build_config
from alignkit.errors import ConfigError, DataError
from alignkit.online import online_config

TRL_DPO = {
    "model_name_or_path": "tiny", "dataset_name": "trl-lib/ultrafeedback_binarized", "dataset_train_split": "train",
    "dataset_test_split": "test", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
    "num_train_epochs": 2, "max_steps": -1, "learning_rate": 5e-7, "lr_scheduler_type": "constant_with_warmup",
    "warmup_ratio": 0.1, "beta": 0.2, "loss_type": "ipo", "max_length": 512, "max_prompt_length": 256, "bf16": True,
    "gradient_checkpointing": True, "logging_steps": 10, "save_steps": 100, "save_total_limit": 3,
    "output_dir": "runs/x", "use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj"],
    "report_to": "none", "seed": 42,
}


def test_a_trl_dpo_config_maps_key_by_key(tmp_path, caplog):
    path = tmp_path / "trl_dpo.yaml"
    path.write_text(yaml.safe_dump(TRL_DPO))
    with caplog.at_level(logging.INFO, logger="alignkit.config"):
        cfg = build_config("dpo", str(path), {})
    assert cfg.model == "tiny" and cfg.loss == "ipo" and cfg.loss_options == {"beta": 0.2}
    assert cfg.train_data.path == "trl-lib/ultrafeedback_binarized" and cfg.train_data.split == "train"
    assert cfg.eval_data.split == "test"
    assert cfg.max_tokens_per_batch == 4 * 512 and cfg.grad_accum == 2  # B x max_length, the stated rule
    assert (cfg.epochs, cfg.max_steps, cfg.lr_schedule, cfg.warmup_ratio) == (2, None, "constant", 0.1)
    assert (cfg.precision, cfg.gradient_checkpointing, cfg.log_every, cfg.save_every, cfg.keep_last) == (
        "bf16", True, 10, 100, 3)
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.report_to == ["jsonl"] and cfg.seed == 42 and cfg.max_prompt_length == 256
    [record] = [r for r in caplog.records if "TRL keys mapped" in r.getMessage()]  # printed once
    assert "per_device_train_batch_size: 4 -> max_tokens_per_batch: 2048" in record.getMessage()


def test_a_trl_grpo_config_maps_onto_online():
    cfg = online_config(None, {"method": "grpo", "model_name_or_path": "tiny", "dataset_name": "data/prompts",
                               "num_generations": 8, "max_completion_length": 96, "beta": 0.0, "loss_type": "dr_grpo",
                               "epsilon_high": 0.28, "temperature": 0.9, "num_iterations": 2, "max_steps": 50,
                               "mask_truncated_completions": True})
    assert cfg.prompts.path == "data/prompts" and cfg.num_samples == 8 and cfg.rounds == 50 and cfg.num_iterations == 2
    assert cfg.sampling.max_new_tokens == 96 and cfg.sampling.temperature == 0.9 and cfg.mask_truncated
    assert cfg.loss_options == {"kl_coef": 0.0, "loss_aggregation": "const-norm", "epsilon_high": 0.28}
    assert online_config(None, {"method": "grpo", "model": "m", "prompts": "p", "loss_type": "cispo"}).method == "cispo"


def test_keys_with_no_meaning_are_named_together_with_what_to_do():
    with pytest.raises(ConfigError) as err:
        build_config("dpo", {**TRL_DPO, "fp16": True, "push_to_hub": True, "per_device_eval_batch_size": 8}, {})
    message = str(err.value)
    for key, advice in (("fp16", "bf16: true"), ("push_to_hub", "final/"), ("per_device_eval_batch_size",
                                                                            "max_tokens_per_batch")):
        assert key in message and advice in message
    with pytest.raises(ConfigError, match="loss_type"):
        build_config("dpo", {**TRL_DPO, "loss_type": "apo_zero"}, {})
    with pytest.raises(ConfigError, match="whole epochs"):
        build_config("dpo", {**TRL_DPO, "num_train_epochs": 1.5}, {})
    # an alignkit config is left alone: no TRL key, no mapping
    plain = build_config("dpo", {"model": "tiny", "train_data": "x.jsonl", "report_to": ["jsonl"]}, {})
    assert plain.report_to == ["jsonl"] and plain.max_tokens_per_batch == 4096


def test_adam_beta2_alone_is_not_lost_and_optim_maps_or_is_refused():
    base = {"model_name_or_path": "tiny", "train_data": "x.jsonl"}
    assert build_config("dpo", {**base, "adam_beta2": 0.95}, {}).adam_betas == (0.9, 0.95)
    assert build_config("dpo", {**base, "adam_beta1": 0.8, "adam_beta2": 0.95}, {}).adam_betas == (0.8, 0.95)
    assert build_config("dpo", {**base, "adam_beta1": 0.8}, {}).adam_betas == (0.8, 0.999)
    for adamw in ("adamw_torch", "adamw_torch_fused"):  # alignkit's own optimizer: nothing to set
        assert build_config("dpo", {**base, "optim": adamw}, {}).adam_moments == "fp32"
    with pytest.raises(ConfigError, match="optim.*adamw_8bit.*adam_moments: bf16"):
        build_config("dpo", {**base, "optim": "adamw_8bit"}, {})


def test_a_trl_dpo_yaml_trains_on_a_local_dataset_folder(task, tmp_path, one_thread):
    import datasets

    from alignkit.data.synthetic import preference_records
    from alignkit.train.loop import train

    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(24, seed=2)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "uf"))
    trl = {"model_name_or_path": str(task.model_dir), "dataset_name": str(tmp_path / "uf"),
           "dataset_train_split": "train_prefs", "per_device_train_batch_size": 4, "max_length": 64,
           "learning_rate": 1e-3, "beta": 0.1, "num_train_epochs": 1, "report_to": "none",
           "output_dir": str(tmp_path / "out"), "logging_steps": 1}
    cfg = build_config("dpo", trl, {"progress": False})
    result = train(cfg, copy.deepcopy(task.model), task.tokenizer)  # the shared fixture stays as it was
    assert result.final_metrics["loss"] == result.final_metrics["loss"]
    assert (tmp_path / "out" / "final" / "README.md").exists()


def test_a_trl_grpo_yaml_runs_online_on_the_tiny_model(task, tmp_path, one_thread):
    """Keys as TRL's GRPO docs write them (GRPOConfig / script args), plus the method and the reward."""
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import prompt_records
    from alignkit.online import run_online

    write_jsonl_atomic(tmp_path / "prompts.jsonl", prompt_records(16, seed=4))
    trl = {"model_name_or_path": str(task.model_dir), "dataset_name": str(tmp_path / "prompts.jsonl"),
           "dataset_train_split": "train", "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-3,
           "beta": 0.0, "loss_type": "dapo", "epsilon_high": 0.28, "max_steps": 2, "per_device_train_batch_size": 8,
           "logging_steps": 1, "report_to": "none", "output_dir": str(tmp_path / "out")}
    cfg = online_config(trl, {"method": "grpo", "reward": "synthetic", "prompts_per_round": 4, "max_length": 64,
                              "eval_samples": 1, "progress": False})
    assert cfg.loss_options["loss_aggregation"] == "token-mean" and cfg.rounds == 2
    result = run_online(cfg, copy.deepcopy(task.model), task.tokenizer)
    assert len(result.rounds) == 2 and (tmp_path / "out" / "final" / "training_state.json").exists()


# ---- TRL's own config files (tests/data/trl: copied from TRL's docs, keys unchanged) through alignkit's CLI ----

TRL_DOCS = Path(__file__).parent / "data" / "trl"


def docs_yaml(name: str, tmp_path, swaps: dict) -> str:
    """A TRL docs YAML with only its hub ids swapped for local paths: every key and every other value as TRL wrote it."""
    text = (TRL_DOCS / name).read_text()
    for hub_id, local in swaps.items():
        assert hub_id in text
        text = text.replace(hub_id, str(local))
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def saved_splits(path, records: list[dict], split: str = "train") -> Path:
    import datasets

    datasets.DatasetDict({split: datasets.Dataset.from_list(records)}).save_to_disk(str(path))
    return path


def trained_config(out: Path) -> dict:
    assert (out / "final" / "README.md").exists() and (out / "final" / "training_state.json").exists()
    return json.loads((out / "config.json").read_text())


def test_trl_docs_dpo_and_kto_yamls_train_through_the_cli(task, tmp_path, one_thread, capsys):
    from alignkit.cli import main
    from alignkit.data.synthetic import preference_records

    hh = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",  # Anthropic/hh-rlhf's shape
           "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in preference_records(16, 3)]
    data = saved_splits(tmp_path / "hh", hh)  # TRL's default dataset_train_split: train
    config = docs_yaml("dpo_config.yaml", tmp_path, {"Qwen/Qwen2.5-0.5B": task.model_dir, "anthropic/hh-rlhf": data})
    assert main(["dpo", "--config", config, "--output_dir", str(tmp_path / "dpo")]) == 0
    cfg = trained_config(tmp_path / "dpo")
    assert cfg["model"] == str(task.model_dir) and cfg["train_data"]["path"] == str(data)
    assert cfg["train_data"]["split"] == "train" and cfg["loss"] == "dpo"

    kto = [{"prompt": [{"role": "user", "content": r["prompt"]}],  # trl-lib/kto-mix-14k's shape
            "completion": [{"role": "assistant", "content": r[side]}], "label": side == "chosen"}
           for r in preference_records(8, 4) for side in ("chosen", "rejected")]
    data = saved_splits(tmp_path / "kto-mix", kto)
    config = docs_yaml("kto_config.yaml", tmp_path, {"Qwen/Qwen2.5-0.5B": task.model_dir, "trl-lib/kto-mix-14k": data})
    assert main(["kto", "--config", config, "--output_dir", str(tmp_path / "kto")]) == 0
    assert trained_config(tmp_path / "kto")["loss"] == "kto"


def test_trl_example_sft_yaml_trains_on_a_text_dataset(task, tmp_path, one_thread):
    from alignkit.cli import main
    from alignkit.data.synthetic import preference_records

    imdb = [{"text": f"{r['prompt']} {r['chosen']}", "label": 1} for r in preference_records(16, 5)]  # imdb's shape
    data = saved_splits(tmp_path / "imdb", imdb)
    config = docs_yaml("sft_example_config.yaml", tmp_path, {"Qwen/Qwen2.5-0.5B": task.model_dir,
                                                             "stanfordnlp/imdb": data})
    # the command its header gives: `trl sft --config config.yaml --output_dir test-sft`
    assert main(["sft", "--config", config, "--output_dir", str(tmp_path / "test-sft")]) == 0
    cfg = trained_config(tmp_path / "test-sft")
    assert (cfg["learning_rate"], cfg["lr_schedule"], cfg["report_to"]) == (0.0001, "cosine", ["jsonl"])


def test_trl_docs_grpo_yaml_runs_online_with_its_accuracy_reward(task, tmp_path, one_thread):
    from alignkit.cli import main
    from alignkit.data.synthetic import prompt_records

    prompts = [{**r, "solution": str(i % 3)} for i, r in enumerate(prompt_records(8, seed=6))]  # Polaris: solution
    data = saved_splits(tmp_path / "polaris", prompts)
    config = docs_yaml("grpo_config.yaml", tmp_path, {"Qwen/Qwen2.5-0.5B": task.model_dir,
                                                      "HuggingFaceH4/Polaris-Dataset-53K": data})
    out = tmp_path / "grpo"
    # TRL's own key names on the command line too, as `trl grpo --config grpo_config.yaml --max_steps 2 ...`
    assert main(["grpo", "--config", config, "--output_dir", str(out), "--max_steps", "2",
                 "--max_completion_length", "6", "--num_generations", "2", "--prompts_per_round", "4",
                 "--eval_samples", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["method"], cfg["reward"], cfg["rounds"], cfg["num_samples"]) == ("grpo", "accuracy", 2, 2)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rounds if "reward" in r]) >= 2


def test_accuracy_reward_reads_the_solution_column():
    from alignkit.rewards.spec import load_reward
    from alignkit.rewards.verifiable.records import bind_records

    reward = bind_records(load_reward("accuracy"), [{"prompt": "2+2?", "solution": "4", "_row": 1}])
    assert reward.score(["2+2?", "2+2?"], ["The answer is \\boxed{4}", "5"]) == [1.0, 0.0]
    with pytest.raises(DataError, match="field 'solution': missing"):
        bind_records(load_reward("accuracy"), [{"prompt": "2+2?", "answer": "4", "_row": 1}])


def test_trl_launcher_keys_name_torchrun_and_write_nothing(task, tmp_path, capsys):
    from alignkit.cli import main

    config = docs_yaml("dpo_config_num_processes.yaml", tmp_path, {"Qwen/Qwen2.5-0.5B": task.model_dir})
    assert main(["dpo", "--config", config, "--output_dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert "num_processes" in err and "torchrun --nproc_per_node" in err and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="reward_funcs"):
        online_config(None, {"method": "grpo", "model": "m", "prompts": "p", "reward_funcs": ["think_format_reward"]})
