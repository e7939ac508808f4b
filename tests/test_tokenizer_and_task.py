"""Character tokenizer (round trip, HF save/load) and the arithmetic task (splits, rewards)."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from nemo_dppo.models.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_tokenizer
from nemo_dppo.tasks.arithmetic import ArithmeticTask, reward, sft_example


def test_tokenizer_ids_are_fixed_and_round_trip() -> None:
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic
    text = "12+34=46 (a*b)-c, ok?\nxyz"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one id per character, plus <bos>
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False).input_ids == ids[1:]
    assert tok("A#", add_special_tokens=False).input_ids == [tok.unk_token_id] * 2
    assert (
        tok.decode([*tok("7", add_special_tokens=False).input_ids, tok.eos_token_id], skip_special_tokens=True) == "7"
    )


def test_tokenizer_save_and_autotokenizer_load(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "tok")
    tok = build_tokenizer(out)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert (cfg["pad_token"], cfg["bos_token"], cfg["eos_token"]) == ("<pad>", "<bos>", "<eos>")
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded("99*3=").input_ids == tok("99*3=").input_ids


def test_task_prompts_answers_and_disjoint_deterministic_splits() -> None:
    task = ArithmeticTask(num_digits=2, ops=("+", "-", "*"), seed=3)
    train = {(p.prompt, p.answer) for p in task.all_problems("train")}
    evals = {(p.prompt, p.answer) for p in task.all_problems("eval")}
    assert train.isdisjoint(evals)
    assert len(train) + len(evals) == 3 * 100 * 100
    assert {p.prompt for p in task.sample(50, "eval")} <= {p for p, _ in evals}
    for prob in task.sample(200, "train"):
        a, op, b = prob.prompt[:2], prob.prompt[2], prob.prompt[3:5]
        assert prob.prompt.endswith("=") and len(prob.prompt) == 6
        assert int(prob.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    same = ArithmeticTask(num_digits=2, ops=("+", "-", "*"), seed=3)
    assert same.sample(20, "train") == ArithmeticTask(num_digits=2, ops=("+", "-", "*"), seed=3).sample(20, "train")
    assert same.all_problems("eval") == task.all_problems("eval")
    other = ArithmeticTask(num_digits=2, ops=("+", "-", "*"), seed=4)
    assert other.all_problems("eval") != task.all_problems("eval")
    with pytest.raises(ValueError):
        task.sample(1, "test")
    with pytest.raises(ValueError):
        ArithmeticTask(ops=("/",))


def test_default_task_example_and_sft_text() -> None:
    task = ArithmeticTask()
    prob = task.sample(1)[0]
    assert prob.prompt[2] == "+" and str(int(prob.prompt[:2]) + int(prob.prompt[3:5])) == prob.answer
    assert sft_example("12+34=", "46") == "12+34=46"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("46", 1.0),
        (" 46\n", 1.0),
        ("46 ", 1.0),
        ("046", -1.0),
        ("4 6", -1.0),
        ("", -1.0),
        ("46+1", -1.0),
        ("\x00\uffff", -1.0),
        (None, -1.0),
    ],
)
def test_reward_edge_cases(response: object, expected: float) -> None:
    assert reward(response, "46") == expected  # type: ignore[arg-type]


def test_reward_custom_values() -> None:
    assert reward("-3", "-3", correct=2.0, wrong=0.0) == 2.0
    assert reward("3", "-3", correct=2.0, wrong=0.0) == 0.0
