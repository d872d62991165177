"""URIAL's token-shift report (arXiv 2312.01552) and its prompt preset: each answer token's rank under the base model
equals a direct per-prefix computation; the shares per bucket follow from those ranks; a model's own greedy answers
are all unshifted under itself; `alignkit eval --baseline` writes the shares and the coloured answers."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.eval.evaluate import run_eval
from alignkit.eval.token_shift import bucket_of, token_ranks, token_shift
from alignkit.generate.engines import HFEngine
from alignkit.generate.presets import URIAL_STOP, urial_prompt
from alignkit.generate.sample import sample
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.recipes.decoding import run_generate

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def models():
    tokenizer = build_word_tokenizer(WORDS)
    aligned = build_tiny_model("llama", len(tokenizer), seed=4, hidden=32, layers=2).eval()
    base = build_tiny_model("llama", len(tokenizer), seed=5, hidden=32, layers=2).eval()
    return aligned, base, tokenizer


def direct_ranks(base, prompt_ids, answer_ids):
    """Per answer token: the whole model on the prefix alone, the vocabulary sorted by logit, the token's place."""
    ranks = []
    for t, token in enumerate(answer_ids):
        with torch.no_grad():
            logits = base(torch.tensor([prompt_ids + answer_ids[:t]])).logits[0, -1]
        order = torch.argsort(logits, descending=True).tolist()
        ranks.append(order.index(token) + 1)
    return ranks


def test_ranks_equal_a_direct_computation(models):
    _, base, _ = models
    generator = torch.Generator().manual_seed(0)
    for length in (1, 5, 12):
        prompt_ids = torch.randint(8, 38, (4,), generator=generator).tolist()
        answer_ids = torch.randint(8, 38, (length,), generator=generator).tolist()
        ranks = token_ranks(base, prompt_ids, answer_ids)
        assert ranks == direct_ranks(base, prompt_ids, answer_ids)
    # a model's own greedy tokens are its top-1 at every position: rank 1 under itself
    greedy = HFEngine(base, build_word_tokenizer(WORDS)).generate([prompt_ids], SamplingOptions(max_new_tokens=10,
                                                                                                 temperature=0))
    assert token_ranks(base, prompt_ids, greedy.ids[0][0]) == [1] * len(greedy.ids[0][0])
    assert [bucket_of(r) for r in (1, 2, 3, 4, 30)] == ["unshifted", "marginal", "marginal", "shifted", "shifted"]


def test_shares_follow_from_the_ranks(models):
    aligned, base, tokenizer = models
    prompts, answers = ["w1 w2 w3", "w4"], ["w5 w6 w7 w8 w9", "w10 w11 w12"]
    summary, per_answer = token_shift(base, tokenizer, prompts, answers)
    ranks = [direct_ranks(base, tokenizer(p, add_special_tokens=False)["input_ids"],
                          tokenizer(a, add_special_tokens=False)["input_ids"]) for p, a in zip(prompts, answers)]
    assert [[r for _, r in tokens] for tokens in per_answer] == ranks
    flat = [r for row in ranks for r in row]
    assert summary["tokens"] == len(flat) == 8 and summary["answers"] == 2
    for name in ("unshifted", "marginal", "shifted"):
        assert summary[name] == pytest.approx(sum(bucket_of(r) == name for r in flat) / len(flat))
    assert summary["mean_rank"] == pytest.approx(sum(flat) / len(flat))


def test_eval_reports_token_shift_against_the_baseline(models, tmp_path):
    aligned, base, tokenizer = models
    for name, model in (("aligned", aligned), ("base", base)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(1, 6)))
    common = {"prompts": str(prompts), "max_new_tokens": 8, "temperature": 0, "reward": "length"}
    # a model's own greedy answers, re-tokenised from text (special tokens the random model emits are dropped, so
    # not every token stays its top-1), are mostly unshifted under itself
    own = run_eval(overrides={**common, "model": str(tmp_path / "base"), "baseline": str(tmp_path / "base"),
                              "output_dir": str(tmp_path / "own")})["summary"]["token_shift"]
    result = run_eval(overrides={**common, "model": str(tmp_path / "aligned"), "baseline": str(tmp_path / "base"),
                                 "output_dir": str(tmp_path / "eval")})
    shift = result["summary"]["token_shift"]
    assert own["unshifted"] > 0.8 > shift["unshifted"] and shift["shifted"] > 0 and sum(shift[b] for b in ("unshifted", "marginal", "shifted")) == pytest.approx(1)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["token_shift"] == shift
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Token shift: the answers of A, coloured by rank under B" in report and "background:#fca5a5" in report and "title='rank " in report
    off = run_eval(overrides={**common, "model": str(tmp_path / "aligned"), "baseline": str(tmp_path / "base"),
                              "output_dir": str(tmp_path / "off"), "token_shift": False})
    assert "token_shift" not in off["summary"]


def test_urial_preset(models, tmp_path):
    aligned, _, tokenizer = models
    text = urial_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "why w3"}])
    assert text.count("# Query:\n```") == 4 and text.count("# Answer:\n```") == 4
    assert text.endswith("# Query:\n```\nwhy w3\n```\n\n# Answer:\n```\n") and urial_prompt("why w3") == text
    aligned.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2"}) + "\n")
    out = run_generate(overrides={"model": str(tmp_path / "m"), "prompts": str(prompts), "preset": "urial",
                                  "output_dir": str(tmp_path / "g"), "max_new_tokens": 6, "temperature": 0})
    expected = sample(aligned, tokenizer, [urial_prompt("w1 w2")],
                      SamplingOptions(max_new_tokens=6, temperature=0, stop=list(URIAL_STOP)))[0][0]
    plain = sample(aligned, tokenizer, ["w1 w2"], SamplingOptions(max_new_tokens=6, temperature=0))[0][0]
    row = json.loads(out.read_text())
    assert row["completion"] == expected != plain and row["prompt"] == "w1 w2"
