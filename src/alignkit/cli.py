"""Command line: `alignkit <method> --config cfg.yaml --key value ...`, plus the quickstart and the main job."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from rich.console import Console
from rich.markup import escape

from alignkit.config import TrainConfig, parse_override, render_help
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import LOSSES, get_loss

console = Console(stderr=True)

USAGE = """usage: alignkit <command> [--config cfg.yaml] [--key value ...]

commands:
  quickstart            [--output_dir DIR] tiny model, synthetic task: SFT then DPO, before/after table + curves (~1-3 min)
  align                 the main job: align SmolLM2-135M-Instruct on CPU, report before/after
  rl                    the second main job: RL with verifiable constraint rewards on SmolLM2, before/after
  train                 train with the loss named in the config (`loss: dpo`)
  sft                   supervised fine-tuning (prompt/completion or `messages` chats; assistant tokens only)
  rm                    train a reward model (Bradley–Terry on pairs); saves an HF sequence-classification model
  rm-eval               --model DIR --data pairs.jsonl: a reward model's pairwise accuracy
  generate              --model DIR --prompts p.jsonl --output_dir DIR [--num_samples N --stop ...]: sample
  decode                --method bon|bon-calibrated|bonbon|args|deal|tq --model DIR --prompts p.jsonl --output_dir DIR
  synth                 --method magpie|self-instruct|principles --model DIR --output_dir DIR: synthetic data
  eval                  --model A [--baseline B] --prompts p.jsonl --output_dir DIR: reward, judged win rate, KL, length
  online                --method grpo|dapo|gspo|cispo|reinforce++|rloo|ppo|online-dpo|self-reward --model DIR
                        --prompts p.jsonl [--reward constraints|math|...]: online RL
  grpo, rloo, ...       online with that method (`alignkit grpo --config grpo.yaml`, as TRL's CLI)
  <loss>                train with that loss: {losses}
  <command> --help      the keys of a command
"""


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    config, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(arg, "expected --key value")
        key, _, inline = arg[2:].partition("=")
        if inline:
            value, i = inline, i + 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(key, "missing a value")
            value, i = argv[i + 1], i + 2
        if key == "config":
            config = value
        else:
            overrides[key] = parse_override(value)
    return config, overrides


def help_for(method: str) -> str:
    """Every command's --help, through the one renderer (config.render_help)."""
    if method == "online" or method in online_methods():
        from alignkit.online.config import command_help

        return command_help()
    if method in ("generate", "decode", "synth", "eval"):
        from alignkit.recipes.decoding import command_help

        return command_help(method)
    if method == "align":
        from alignkit.recipes.align import AlignConfig

        return render_help(AlignConfig, "alignkit align [--config cfg.yaml] [--key value ...]")
    if method == "rl":
        from alignkit.recipes.rl import RLConfig

        return render_help(RLConfig, "alignkit rl [--config cfg.yaml] [--key value ...]")
    if method == "rm-eval":
        return ("alignkit rm-eval --model DIR --data pairs.jsonl [--max_length 1024]\n\n"
                "Scores chosen and rejected of every pair with the reward model in DIR (HF format, e.g. the final/\n"
                "of `alignkit rm`) and prints the accuracy (chosen scored higher; ties count half) and mean margin.")
    notes = []
    if method in LOSSES:
        spec = get_loss(method)
        notes = [f"options of '{method}' ({spec.paper}; data: {spec.data_shape}; reference model: "
                 f"{'yes' if spec.needs_reference else 'no'}), as --loss_options.NAME or just --NAME:"]
        notes += [f"  --{f.name:<26} {f.default!r}" for f in dataclasses.fields(spec.options)]
    return render_help(TrainConfig, f"alignkit {method} --config cfg.yaml [--key value ...]", notes)


def run_rm_eval(overrides: dict) -> None:
    from alignkit.rewards.model import RewardModelScorer, pair_accuracy

    for key in ("model", "data"):
        if key not in overrides:
            raise ConfigError(key, "required: alignkit rm-eval --model DIR --data pairs.jsonl")
    unknown = sorted(set(overrides) - {"model", "data", "max_length"})
    if unknown:
        raise ConfigError(unknown[0], "unknown key; rm-eval takes --model, --data and --max_length")
    scorer = RewardModelScorer(str(overrides["model"]), max_length=int(overrides.get("max_length", 1024)))
    result = pair_accuracy(scorer, str(overrides["data"]))
    print(f"accuracy {result['accuracy']:.4f} on {result['pairs']} pairs (mean margin {result['margin']:+.4f}, "
          f"chosen {result['chosen_reward']:+.4f}, rejected {result['rejected_reward']:+.4f})")


def online_methods() -> tuple[str, ...]:
    from alignkit.online.methods import ONLINE_METHODS

    return tuple(ONLINE_METHODS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(losses=", ".join(sorted(n for n, s in LOSSES.items() if s.data_shape != "rollouts"))))
        return 0
    command, rest = argv[0], argv[1:]
    if "--help" in rest or "-h" in rest:
        print(help_for(command))
        return 0
    try:
        config, overrides = parse_overrides(rest)
        if command == "quickstart":
            from alignkit.recipes.quickstart import run_quickstart

            unknown = sorted(set(overrides) - {"output_dir", "seed"})
            if unknown:
                raise ConfigError(unknown[0], "unknown key; quickstart takes --output_dir and --seed")
            run_quickstart(overrides.get("output_dir", "runs/quickstart"), seed=int(overrides.get("seed", 0)))
        elif command == "rm-eval":
            run_rm_eval(overrides)
        elif command in ("generate", "decode", "synth"):
            from alignkit.recipes import decoding

            getattr(decoding, "run_" + command)(config, overrides)  # logs what it wrote
        elif command == "eval":
            from alignkit.eval.evaluate import run_eval

            console.print(f"report: {run_eval(config, overrides)['paths']['html']}")
        elif command == "online" or command in online_methods():
            from alignkit.online.run import run_online_cli

            if command != "online":  # `alignkit grpo --config grpo.yaml`, as `trl grpo` is called
                overrides = {"method": command, **overrides}
            run_online_cli(config, overrides)  # logs the reward gain and where it wrote
        elif command == "align":
            from alignkit.recipes.align import run_align

            run_align(config, overrides)
        elif command == "rl":
            from alignkit.recipes.rl import run_rl

            run_rl(config, overrides)
        elif command == "train" or command in LOSSES:
            from alignkit.api import build_config
            from alignkit.train.loop import train

            cfg = build_config(None if command == "train" else command, config, overrides)
            result = train(cfg)
            if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
                console.print(f"saved {result.output_dir / 'final'}")
        else:
            raise ConfigError("<command>", f"unknown command '{command}'; run `alignkit --help`")
    except AlignkitError as err:
        # One line, whatever the terminal width; the message is plain text (it may quote user input with "[").
        message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())  # e.g. YAML errors
        console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
