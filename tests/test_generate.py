"""Generation (generate/sample.py, vllm_backend.py, `alignkit generate`) and synthetic data (generate/synth.py) on
the synthetic task: seeds reproduce samples, stop strings cut (a special token as a stop string ends generation on it), the CLI writes JSONL and names bad prompt rows,
Magpie elicits prompts from a tiny chat template, self-instruct and principle-driven data are valid records."""

from __future__ import annotations

import json
import re

import pytest
import torch

from alignkit.cli import main
from alignkit.config import SamplingOptions
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.data.synthetic import TOPICS
from alignkit.errors import AlignkitError, DataError
from alignkit.generate.engines import make_engine, truncate_at_stop
from alignkit.generate.engines.vllm import vllm_available
from alignkit.generate.sample import sample, sample_with_counts
from alignkit.generate.synth import (
    MagpieOptions,
    PairOptions,
    Principles,
    SelfInstructOptions,
    dedupe,
    magpie_prompts,
    pre_query_template,
    principle_driven,
    respond,
    rouge_l,
    self_instruct_prompts,
)
from alignkit.generate.vllm_backend import load_generator
from alignkit.recipes.decoding import run_generate
from synthetic_task import SENTIMENT, prompts

PROMPT_PATTERN = re.compile(rf"^(review|describe|rate|tell) (my|your|the|latest) ({'|'.join(TOPICS)}) :$")


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run on one thread (tests/conftest.py)


def test_same_seed_same_samples_other_seed_other_samples(task):
    cfg = SamplingOptions(max_new_tokens=10, batch_size=8)
    questions = prompts(16)
    before = torch.get_rng_state()
    first = sample(task.model, task.tokenizer, questions, cfg, num_samples=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    again = sample(task.model, task.tokenizer, questions, cfg, num_samples=3, seed=5)
    other = sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=10, batch_size=8), 3, 6)
    assert first == again
    assert first != other
    assert sum(a != b for x, y in zip(first, other) for a, b in zip(x, y)) > 24  # most of the 48 samples differ


def test_stop_strings_cut_the_same_samples(task):
    questions = prompts(16)
    plain = sample_with_counts(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=10), 2, 1)
    stopped = sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=10,
                                                                          stop=("good", "bad")), 2, 1)
    expected = [[truncate_at_stop(t, ("good", "bad")).strip() for t in group] for group in plain.texts]
    assert stopped == expected
    assert any(a != b for x, y in zip(plain.texts, stopped) for a, b in zip(x, y))  # some sample was cut
    assert all(1 <= n <= 10 for row in plain.num_tokens for n in row)


def test_truncate_at_stop():
    assert truncate_at_stop("one\ntwo", ("\n",)) == "one"
    assert truncate_at_stop("a STOP b END c", ("END", "STOP")) == "a "  # the earliest occurrence wins
    assert truncate_at_stop("no stop here", ("", "zzz")) == "no stop here"


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_a_stop_string_that_is_a_special_token_stops_generation(task, one_thread, engine):
    """`stop: ["<|end|>"]`, a special token that decoding drops: matched as a token, generation ends on it, the
    sample keeps it as its last id (like an end token) and its text is what came before."""
    tok = task.tokenizer
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = [tok("<|user|>", add_special_tokens=False)["input_ids"]] * 6
    free_cfg = SamplingOptions(max_new_tokens=16, engine=engine)
    free = make_engine(task.model, tok, free_cfg).generate(ids, free_cfg, 2, 2)
    stop_cfg = SamplingOptions(max_new_tokens=16, engine=engine, stop=("<|end|>",))
    stopped = make_engine(task.model, tok, stop_cfg).generate(ids, stop_cfg, 2, 2)
    hits = 0
    for group_free, group_stop, texts, reasons in zip(free.ids, stopped.ids, stopped.texts, stopped.finish_reasons):
        for row_free, row_stop, text, reason in zip(group_free, group_stop, texts, reasons):
            if end in row_free:
                hits += 1
                cut = row_free.index(end) + 1
                assert row_stop == row_free[:cut] and reason == "stop"
                assert text == tok.decode(row_free[:cut - 1], skip_special_tokens=True).strip()
            else:
                assert row_stop == row_free
    assert hits >= 3  # the case exercises the stop


def test_top_k_one_is_greedy(task):
    questions = prompts(8)
    greedy = sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=8, temperature=0.0))
    top1 = sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=8, top_k=1), seed=3)
    assert greedy == top1


def test_generate_cli_writes_jsonl_atomically(task, tmp_path):
    questions = prompts(6)
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": q, "id": i} for i, q in enumerate(questions)])
    out = tmp_path / "out" / "samples.jsonl"
    code = main(["generate", "--model", str(task.model_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--output_dir", str(out.parent), "--num_samples", "2", "--max_new_tokens", "8", "--seed", "4", "--engine", "auto"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == questions and [r["id"] for r in rows] == list(range(6))
    expected = sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=8), 2, 4)
    assert [r["responses"] for r in rows] == expected  # the CLI samples what the Python API samples
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.jsonl"]  # no temporary file left


def test_generate_bad_prompts_file_is_a_named_data_error(task, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "review my movie :"}\n{"question": "no prompt field"}\n')
    out = tmp_path / "out.jsonl"
    args = {"model": str(task.model_dir), "prompts": str(bad), "output_dir": str(out.parent / "gen")}
    with pytest.raises(DataError) as err:
        run_generate(overrides=args)
    assert (err.value.row, err.value.field) == (2, "prompt")
    assert main(["generate", *[x for k, v in args.items() for x in (f"--{k}", v)]]) == 2
    assert "row 2, field 'prompt': missing field" in capsys.readouterr().err
    bad.write_text('{"prompt": "   "}\n')
    with pytest.raises(DataError, match="row 1, field 'prompt': string is only whitespace"):
        run_generate(overrides=args)
    assert not out.exists()


@pytest.mark.skipif(vllm_available(), reason="vllm and CUDA are available here: the fallback is not what runs")
def test_vllm_backend_is_guarded(task):
    model, tokenizer = load_generator(str(task.model_dir), "auto")
    assert not hasattr(model, "update_weights") and isinstance(model, torch.nn.Module)  # the HF model, no engine
    with pytest.raises(AlignkitError, match="vllm"):
        load_generator(str(task.model_dir), "vllm")


# ---- synthetic data ----


def test_magpie_elicits_prompts_from_the_pre_query_template(task):
    assert pre_query_template(task.tokenizer) == ("<|user|> ", "<|end|>")
    assert pre_query_template(task.tokenizer, system="be kind")[0] == "<|system|> be kind <|end|> <|user|> "
    records = magpie_prompts(task.model, task.tokenizer, 40, SamplingOptions(max_new_tokens=12))
    texts = [r["prompt"] for r in records]
    assert 20 <= len(texts) <= 40 and len(set(texts)) == len(texts)
    assert all("<|" not in t for t in texts)  # cut at the end-of-turn token, special tokens dropped
    well_formed = sum(bool(PROMPT_PATTERN.match(t)) for t in texts) / len(texts)
    assert well_formed >= 0.5, texts  # the model writes user turns of the task's form
    assert len(load_records(records, shape="prompts")) == len(records)


def test_magpie_responses_as_sft_and_pairs(task):
    records = magpie_prompts(task.model, task.tokenizer, 12, SamplingOptions(max_new_tokens=12), MagpieOptions(seed=1))
    sft = respond(task.model, task.tokenizer, records, "sft", SamplingOptions(max_new_tokens=8, temperature=0.0))
    assert sft and load_records(sft, shape="sft")
    assert all(r["prompt"][0]["role"] == "user" for r in sft)
    pairs = respond(task.model, task.tokenizer, records, "pairs", SamplingOptions(max_new_tokens=8),
                    PairOptions(SENTIMENT, num_responses=4, seed=2))
    assert pairs and load_records(pairs, shape="pairs")
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    with pytest.raises(AlignkitError, match="reward"):
        respond(task.model, task.tokenizer, records, "pairs")


def test_dedupe_and_rouge_l():
    assert dedupe(["Rate my game :", "rate  my GAME :", "", "tell the day :"]) == ["Rate my game :", "tell the day :"]
    assert rouge_l("a b c d", "a c d e") == pytest.approx(2 * 3 / 8)  # LCS "a c d"
    assert rouge_l("x", "") == 0.0 and rouge_l("same words", "same words") == 1.0


def test_self_instruct_keeps_new_dissimilar_tasks(task):
    seeds = prompts(6, seed=21)
    records = self_instruct_prompts(task.model, task.tokenizer, seeds, 5, SamplingOptions(max_new_tokens=8),
                                    SelfInstructOptions(example_format="{task}", separator=" "))
    assert 1 <= len(records) <= 5
    texts = [r["prompt"] for r in records]
    pool = list(seeds)
    for text in texts:  # each kept task is unlike every task in the pool when it was made
        assert all(rouge_l(text, other) < 0.7 for other in pool)
        pool.append(text)
    assert load_records(records, shape="prompts")


def test_principle_driven_sft_and_contrast_pairs(task):
    questions = prompts(10, seed=31)
    sft = principle_driven(task.model, task.tokenizer, questions, Principles(["be positive"]),
                           SamplingOptions(max_new_tokens=8))
    assert sft and load_records(sft, shape="sft")
    assert all("principle" not in json.dumps(r["prompt"]) for r in sft)  # stored without the principles
    pairs = principle_driven(task.model, task.tokenizer, questions, Principles(["be positive"], ["be negative"]),
                             SamplingOptions(max_new_tokens=8), reward=SENTIMENT)
    assert pairs and load_records(pairs, shape="pairs")
    assert all(SENTIMENT([p["prompt"]], [p["chosen"]])[0] > SENTIMENT([p["prompt"]], [p["rejected"]])[0] for p in pairs)


def test_synth_cli_writes_magpie_prompts_and_pairs(task, tmp_path):
    out = tmp_path / "magpie" / "data.jsonl"
    assert main(["synth", "--method", "magpie", "--model", str(task.model_dir), "--output_dir", str(out.parent), "--num_prompts", "12",
                 "--max_new_tokens", "12"]) == 0
    assert 6 <= len(load_records(out, shape="prompts")) <= 12
    assert main(["synth", "--method", "magpie", "--model", str(task.model_dir), "--output_dir", str(out.parent), "--num_prompts", "12",
                 "--max_new_tokens", "12", "--shape", "pairs", "--reward", "synthetic"]) == 0
    assert load_records(out, shape="pairs")
    assert main(["synth", "--method", "magpie", "--model", str(task.model_dir), "--output_dir", str(out.parent),
                 "--shape", "pairs"]) == 2  # pairs need a reward
