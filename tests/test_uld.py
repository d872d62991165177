"""Cross-tokenizer distillation (loss uld, teacher_tokenizer: own): the byte alignment of two tokenisations
(data/crosstok.py), the ULD distance (losses/uld.py) against NumPy and TRL 1.16's ULDLoss, and training a student
toward a teacher whose byte-level BPE tokenizer is trained here from a small corpus (no download)."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.config import TrainConfig
from alignkit.data.crosstok import align_groups, byte_ends, cross_tokenize
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import sft_records
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.losses.uld import group_distances
from alignkit.models.tiny import build_tiny_model
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train
from conftest import import_trl

pytestmark = pytest.mark.usefixtures("one_thread")


def bpe_tokenizer(vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the synthetic task's texts: words split into pieces unlike the
    student's word-level tokens."""
    corpus = [r[key] for r in sft_records(200, seed=3) for key in ("prompt", "completion")]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def spans(ends):
    return list(zip([0, *ends[:-1]], ends))


def test_the_alignment_is_exact_where_the_tokenisations_coincide(task):
    student = task.tokenizer
    for record in sft_records(6, seed=4):
        ids = encode(student, record["completion"]) + [student.eos_token_id]
        example = TokenizedExample(encode(student, record["prompt"]), [ids])
        crossed = cross_tokenize(example, student, student)
        assert crossed.teacher_example.response_ids == [ids] and crossed.teacher_example.prompt_ids == example.prompt_ids
        s_groups, t_groups = crossed.groups[0]
        assert s_groups == t_groups == [[i] for i in range(len(ids) - 1)]  # every word its own group; EOS in none


def test_the_alignment_pairs_runs_of_tokens_spelling_the_same_bytes(task):
    student, teacher = task.tokenizer, bpe_tokenizer()
    merged = 0
    for record in sft_records(8, seed=5):
        text = record["completion"]
        s_ids, t_ids = encode(student, text), encode(teacher, text)
        s_ends, t_ends = byte_ends(student, s_ids), byte_ends(teacher, t_ids)
        assert s_ends[-1] == t_ends[-1] == len(text.encode())
        s_groups, t_groups = align_groups(s_ends, t_ends)
        assert [i for g in s_groups for i in g] == list(range(len(s_ids)))
        assert [i for g in t_groups for i in g] == list(range(len(t_ids)))
        for s_group, t_group in zip(s_groups, t_groups):  # each pair spells the same bytes
            assert spans(s_ends)[s_group[0]][0] == spans(t_ends)[t_group[0]][0]
            assert s_ends[s_group[-1]] == t_ends[t_group[-1]]
            merged += len(t_group) > 1
    assert merged > 0  # the BPE really splits words the student keeps whole


def numpy_uld(student_logits, teacher_logits, groups, ids):
    """ULD at each aligned group: chain-rule merge (last position's distribution times the earlier tokens'
    probabilities, floored at 1e-8), both sorted descending, zero-padded, L1."""
    def merged(logits, side):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        rows = []
        for group in groups[side]:
            scale = np.prod([max(p[i, ids[side][i]], 1e-8) for i in group[:-1]])
            rows.append(p[group[-1]] * scale)
        return np.array(rows)

    s, t = merged(student_logits, 0), merged(teacher_logits, 1)
    width = max(s.shape[1], t.shape[1])
    s = np.pad(-np.sort(-s, axis=1), ((0, 0), (0, width - s.shape[1])))
    t = np.pad(-np.sort(-t, axis=1), ((0, 0), (0, width - t.shape[1])))
    return np.abs(s - t).sum(1)


def random_pair(seed=0):
    rng = np.random.default_rng(seed)
    groups = ([[0], [1, 2], [3], [4]], [[0, 1], [2], [3], [4, 5, 6]])
    ids = (rng.integers(0, 11, 5), rng.integers(0, 17, 7))
    return rng.normal(size=(5, 11)) * 2, rng.normal(size=(7, 17)) * 2, groups, ids


def test_uld_distance_equals_numpy():
    student, teacher, groups, ids = random_pair()
    ours = group_distances(torch.log_softmax(torch.tensor(student), -1), torch.log_softmax(torch.tensor(teacher), -1),
                           groups, tuple(torch.tensor(i) for i in ids))
    np.testing.assert_allclose(ours.numpy(), numpy_uld(student, teacher, groups, ids), rtol=1e-10)


def test_uld_equals_trl_uld_loss():
    gold = import_trl("trl.experimental.gold.gold_trainer")
    config = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
        uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False)
    trl_loss = gold.ULDLoss(config)
    student, teacher, groups, ids = random_pair(1)
    # TRL takes logits at every position of [prompt + answer] ("bayesian": row k - 1 predicts answer token k) and byte
    # offsets of the answer tokens, from which it aligns the groups itself
    s_ends, t_ends = [2, 3, 5, 6, 9], [1, 2, 5, 6, 7, 8, 9]
    assert align_groups(s_ends, t_ends) == groups == tuple(gold.ULDLoss._align_by_byte_offsets(spans(s_ends),
                                                                                              spans(t_ends)))
    prompt = 2
    s_logits = torch.tensor(np.concatenate([np.zeros((prompt - 1, 11)), student, np.zeros((1, 11))]))[None]
    t_logits = torch.tensor(np.concatenate([np.zeros((prompt - 1, 17)), teacher, np.zeros((1, 17))]))[None]
    s_input = torch.tensor([[0] * prompt + ids[0].tolist()])
    t_input = torch.tensor([[0] * prompt + ids[1].tolist()])
    labels = lambda inp: torch.where(torch.arange(inp.shape[1]) < prompt, -100, inp)  # noqa: E731
    offsets = lambda ends: torch.tensor([[(0, 0)] * prompt + spans(ends)])  # noqa: E731
    expected = trl_loss(s_logits, t_logits, labels(s_input), labels(t_input), s_input, t_input,
                        offsets(s_ends), offsets(t_ends))
    ours = group_distances(torch.log_softmax(torch.tensor(student), -1), torch.log_softmax(torch.tensor(teacher), -1),
                           groups, tuple(torch.tensor(i) for i in ids)).mean()
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def cross_setup(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("uld")
    tokenizer = bpe_tokenizer(400)  # most words one token: groups mostly one token each side (an untrained teacher's
    # merged probabilities of longer groups are near 0, where ULD's gradient vanishes)
    teacher = build_tiny_model("llama", len(tokenizer), seed=1, hidden=48, layers=2)
    with torch.no_grad():  # peaked distributions, whose sorted shape a 60-token student can match
        teacher.get_output_embeddings().weight.mul_(30)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    write_jsonl_atomic(root / "sft.jsonl", sft_records(32, seed=7))
    return root


def config(root, out, **overrides) -> TrainConfig:
    values = dict(model="tiny", loss="uld", train_data=str(root / "sft.jsonl"), teacher=str(root / "teacher"),
                  teacher_tokenizer="own", max_length=64, max_tokens_per_batch=256, max_tokens_per_row=128, seed=0,
                  progress=False, learning_rate=2e-2, epochs=3, log_every=1, output_dir=str(out))
    return TrainConfig(**{**values, **overrides})


def test_uld_training_moves_the_student_toward_a_teacher_with_another_tokenizer(task, cross_setup, tmp_path):
    train(config(cross_setup, tmp_path), copy.deepcopy(task.model), task.tokenizer)
    rows = [row["distill/uld"] for row in read_metrics(tmp_path) if "distill/uld" in row]
    start, end = sum(rows[:2]) / 2, sum(rows[-2:]) / 2
    print(f"uld: {start:.4f} -> {end:.4f}")
    assert len(rows) > 4 and end < 0.8 * start


def test_another_vocabulary_is_refused_unless_asked_for(task, cross_setup, tmp_path):
    cases = [
        ({"teacher_tokenizer": "shared"}, r"'teacher': the teacher's vocabulary has \d+ tokens.*teacher_tokenizer: own"),
        ({"loss": "gkd"}, r"'teacher_tokenizer': loss 'gkd' compares distributions over one vocabulary"),
        ({"loss": "gkd", "teacher_tokenizer": "shared"}, r"'teacher': the teacher's vocabulary has"),
        ({"teacher": None}, r"'teacher': loss 'uld' needs a teacher"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(ConfigError, match=message):
            train(config(cross_setup, out, **overrides), copy.deepcopy(task.model), task.tokenizer)
        assert not out.exists()


def test_chat_records_are_refused_by_row(task):
    from alignkit.errors import DataError
    from alignkit.train.cross_teacher import with_teacher_tokens

    chat = TokenizedExample([5, 6], [[7, 8]], "chats.jsonl", 3, response_loss_masks=[[True, False]])
    with pytest.raises(DataError, match=r"chats.jsonl, row 3, field 'messages': loss uld .* not chats"):
        with_teacher_tokens([chat], task.tokenizer, bpe_tokenizer())
