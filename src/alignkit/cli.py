"""Command line: `alignkit <method> --config cfg.yaml --key value ...`, plus the quickstart and the main job."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from alignkit.config import parse_override, render_help
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import LOSSES, get_loss

console = Console(stderr=True)

USAGE = """usage: alignkit <command> [--config cfg.yaml] [--key value ...]

commands:
{commands}
  grpo, rloo, ...       online with that method (`alignkit grpo --config grpo.yaml`, as TRL's CLI)
  <loss>                train with that loss: {losses}
  <command> --help      the keys of a command
"""
KEYS = "[--config cfg.yaml] [--key value ...]"


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



def _load(path: str):
    """module:attr, imported when a command runs (the CLI starts without importing torch)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Command:
    """One `alignkit <name>`: its line in `alignkit --help`, what runs it and what `--help` shows."""

    usage: str
    run: Callable[[str, str | None, dict], None]  # (command name, --config, overrides)
    config: str | None = None  # module:Class whose keys `--help` lists
    help: Callable[[str], str] | None = None  # the command's --help, when it is more than its config's keys


def _train(name: str, config, overrides: dict) -> None:
    from alignkit.api import build_config
    from alignkit.train.loop import train

    result = train(build_config(None if name == "train" else name, config, overrides))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        console.print(f"saved {result.output_dir / 'final'}")


def _online(name: str, config, overrides: dict) -> None:
    from alignkit.online.run import run_online_cli

    if name != "online":  # `alignkit grpo --config grpo.yaml`, as `trl grpo` is called
        overrides = {"method": name, **overrides}
    run_online_cli(config, overrides)  # logs the reward gain and where it wrote


def _decoding(name: str, config, overrides: dict) -> None:
    from alignkit.recipes import decoding

    getattr(decoding, "run_" + name)(config, overrides)  # logs what it wrote


def _eval(name: str, config, overrides: dict) -> None:
    from alignkit.eval.evaluate import run_eval

    console.print(f"report: {run_eval(config, overrides)['paths']['html']}")


def _recipe(path: str) -> Callable[[str, str | None, dict], None]:
    return lambda name, config, overrides: _load(path)(config, overrides)


def _quickstart(name: str, config, overrides: dict) -> None:
    from alignkit.recipes.quickstart import run_quickstart

    unknown = sorted(set(overrides) - {"output_dir", "seed"})
    if unknown:
        raise ConfigError(unknown[0], "unknown key; quickstart takes --output_dir and --seed")
    run_quickstart(overrides.get("output_dir", "runs/quickstart"), seed=int(overrides.get("seed", 0)))


def _prm(name: str, config, overrides: dict) -> None:
    from alignkit.config import load_command_config
    from alignkit.train.prm import PRMConfig, train_prm

    result = train_prm(load_command_config(PRMConfig, config, overrides))
    console.print(f"saved {result.output_dir / 'final'}")


def run_rm_eval(name: str, config, overrides: dict) -> None:
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


def _loss_help(name: str) -> str:
    """A training command's keys, then (for a loss command) the loss's options, through config.render_help."""
    from alignkit.config import TrainConfig

    if name not in LOSSES:
        return render_help(TrainConfig, f"alignkit {name} --config cfg.yaml [--key value ...]")
    spec = get_loss(name)
    title = (f"options of '{name}' ({spec.paper}; data: {spec.data_shape}; reference model: "
             f"{'yes' if spec.needs_reference else 'no'}), as --loss_options.NAME or just --NAME:")
    return render_help(TrainConfig, f"alignkit {name} --config cfg.yaml [--key value ...]", options=(title, spec.options))


def _online_help(name: str) -> str:
    from alignkit.online.config import command_help

    return command_help()


def _decoding_help(name: str) -> str:
    from alignkit.recipes.decoding import command_help

    return command_help(name)


_RM_EVAL_HELP = ("alignkit rm-eval --model DIR --data pairs.jsonl [--max_length 1024]\n\n"
                 "Scores chosen and rejected of every pair with the reward model in DIR (HF format, e.g. the final/\n"
                 "of `alignkit rm`) and prints the accuracy (chosen scored higher; ties count half) and mean margin.")

COMMANDS: dict[str, Command] = {
    "quickstart": Command("[--output_dir DIR] tiny model, synthetic task: SFT then DPO, before/after table + curves "
                          "(~1-3 min)", _quickstart,
                          help=lambda name: "alignkit quickstart [--output_dir DIR] [--seed N]"),
    "align": Command("the main job: align SmolLM2-135M-Instruct on CPU, report before/after",
                     _recipe("alignkit.recipes.align:run_align"), "alignkit.recipes.align:AlignConfig"),
    "rl": Command("the second main job: RL with verifiable constraint rewards on SmolLM2, before/after",
                  _recipe("alignkit.recipes.rl:run_rl"), "alignkit.recipes.rl:RLConfig"),
    "agent": Command("the third main job: RL on multi-turn tool use (a calculate tool) on SmolLM2, before/after",
                     _recipe("alignkit.recipes.agent:run_agent"), "alignkit.recipes.agent:AgentConfig"),
    "distill": Command("--teacher T --model S [--lmbda 0..1 --seq_kd --loss gkd|opd|uld] [--train_data d.jsonl]: "
                       "distillation\n" f"{'':24}on student samples, dataset completions or a seeded mix of them",
                       _recipe("alignkit.recipes.distill:run_distill"), "alignkit.recipes.distill:DistillConfig",
                       help=lambda name: _load("alignkit.recipes.distill:command_help")()),
    "train": Command("train with the loss named in the config (`loss: dpo`)", _train, help=_loss_help),
    "sft": Command("supervised fine-tuning (prompt/completion or `messages` chats; assistant tokens only)", _train,
                   help=_loss_help),
    "rm": Command("train a reward model (Bradley–Terry on pairs); saves an HF sequence-classification model", _train,
                  help=_loss_help),
    "prm": Command("train a process reward model (stepwise rows: prompt, completions, labels); saves an HF token "
                   "classifier", _prm, "alignkit.train.prm:PRMConfig"),
    "rm-eval": Command("--model DIR --data pairs.jsonl: a reward model's pairwise accuracy", run_rm_eval,
                       help=lambda name: _RM_EVAL_HELP),
    "generate": Command("--model DIR --prompts p.jsonl --output_dir DIR [--num_samples N --stop ...]: sample",
                        _decoding, help=_decoding_help),
    "decode": Command("--method bon|bon-calibrated|bonbon|args|deal|tq --model DIR --prompts p.jsonl --output_dir DIR",
                      _decoding, help=_decoding_help),
    "synth": Command("--method magpie|self-instruct|principles --model DIR --output_dir DIR: synthetic data",
                     _decoding, help=_decoding_help),
    "eval": Command("--model A [--baseline B] --prompts p.jsonl --output_dir DIR: reward, judged win rate, KL, length",
                    _eval, help=_decoding_help),
    "online": Command("--method grpo|dapo|gspo|cispo|reinforce++|rloo|ppo|online-dpo|self-reward --model DIR\n"
                      f"{'':24}--prompts p.jsonl [--reward constraints|math|...]: online RL", _online,
                      help=_online_help),
}


def online_methods() -> tuple[str, ...]:
    from alignkit.online.methods import ONLINE_METHODS

    return tuple(ONLINE_METHODS)


def command_of(name: str) -> Command:
    """The command `alignkit <name>` runs: a named command, an online method (online) or a loss (train)."""
    if name in COMMANDS:
        return COMMANDS[name]
    if name in online_methods():
        return COMMANDS["online"]
    if name in LOSSES:
        return COMMANDS["train"]
    raise ConfigError("<command>", f"unknown command '{name}'; run `alignkit --help`")


def help_for(name: str) -> str:
    """Every command's --help, through the one renderer (config.render_help)."""
    command = command_of(name)
    if command.help is not None:
        return command.help(name)
    return render_help(_load(command.config), f"alignkit {name} {KEYS}")


def usage() -> str:
    lines = [f"  {name:<21} {command.usage}" for name, command in COMMANDS.items()]
    losses = ", ".join(sorted(n for n, s in LOSSES.items() if s.data_shape != "rollouts"))
    return USAGE.format(commands="\n".join(lines), losses=losses)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if "--help" in rest or "-h" in rest:
            print(help_for(name))
            return 0
        config, overrides = parse_overrides(rest)
        command_of(name).run(name, config, overrides)
    except AlignkitError as err:
        # One line, whatever the terminal width; the message is plain text (it may quote user input with "[").
        message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())  # e.g. YAML errors
        console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
