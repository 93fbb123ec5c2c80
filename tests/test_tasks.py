"""entrl.data.tasks: prompt building/tokenization and the synthetic arithmetic task."""

import logging
import re

import numpy as np
import pytest

from entrl.data.sources import Record
from entrl.data.tasks import SENT_SUFFIX, ArithmeticTask, build_prompt, encode_prompt, tokenize_prompts
from entrl.tokenizer import CharTokenizer, load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A tiny BOS-less ChatML tokenizer with a whitespace WordLevel vocabulary."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <pad> <|endoftext|> <|im_start|> <|im_end|> user assistant what is 1 2 + ? Please system".split()
    raw = RawTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|endoftext|>",
                                 pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHATML
    path = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(str(path))
    return load_tokenizer(str(path))


# -- prompts -----------------------------------------------------------------


def test_build_prompt_chat_template(hf_tok):
    text = build_prompt("what is 1 + 2 ?", hf_tok)
    assert text == f"<|im_start|>user\nwhat is 1 + 2 ?\n{SENT_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt("what is 1 + 2 ?", hf_tok, chat_template=False) == f"what is 1 + 2 ?\n{SENT_SUFFIX}"
    assert build_prompt("x", hf_tok, suffix="", chat_template=False) == "x"


def test_char_prompt_is_short():
    tok = CharTokenizer()
    assert build_prompt("3+4*2", tok, suffix="") == "3+4*2="
    assert build_prompt("3+4*2", tok, suffix="", chat_template=False) == "3+4*2"


def test_tokenize_prompts_drop_and_error(hf_tok, caplog):
    recs = [Record("short", "what is 1 + 2 ?", "3"), Record("long", " ".join(["1 + 1"] * 30), "30"),
            Record("short2", "what is 2 ?", "2")]
    with caplog.at_level(logging.WARNING):
        tokens, kept, dropped = tokenize_prompts(recs, hf_tok, max_prompt_len=20, suffix="")
    assert [r.id for r in kept] == ["short", "short2"] and dropped == 1
    assert "dropped 1 of 3 prompts" in caplog.text
    # <|im_start|> user \n? -- WhitespaceSplit drops the newlines; no BOS for a BOS-less tokenizer.
    assert tokens[0] == hf_tok.encode(build_prompt("what is 1 + 2 ?", hf_tok, suffix=""))
    assert tokens[0][0] == 3 and max(map(len, tokens)) <= 20
    with pytest.raises(ValueError, match=r"row 1 \(id='long'\).*> max_prompt_len=20"):
        tokenize_prompts(recs, hf_tok, max_prompt_len=20, suffix="", on_long_prompt="error")


def test_tokenize_prompts_char_bos_option():
    tok = CharTokenizer()
    rec = [Record("a", "3+4*2", "11")]
    tokens, kept, dropped = tokenize_prompts(rec, tok, max_prompt_len=16, suffix="")
    assert tokens == [tok.encode("3+4*2=")] == [encode_prompt("3+4*2", tok, suffix="")] and dropped == 0
    tokens, _, _ = tokenize_prompts(rec, tok, max_prompt_len=16, suffix="", add_bos=True)
    assert tokens == [[tok.bos_token_id] + tok.encode("3+4*2=")]
    # Never twice: a prompt that already starts with BOS is left alone.
    assert encode_prompt("3", _BosFirst(), suffix="", add_bos=True) == [1] + tok.encode("3=")


class _BosFirst(CharTokenizer):
    """A template that renders BOS itself (like Llama 3 / DeepSeek templates)."""

    def encode(self, text):
        return [1] + super().encode(text.replace("<bos>", ""))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<bos>" + super().apply_chat_template(messages, tokenize, add_generation_prompt)


# -- chat-message prompts (verl / TRL datasets) ---------------------------------

VERL_ROWS = [
    {"prompt": [{"role": "system", "content": "Please"}, {"role": "user", "content": "what is 1 + 2 ?"}],
     "reward_model": {"ground_truth": "3", "style": "rule"}, "extra_info": {"index": 0}, "data_source": "t"},
    {"prompt": [{"role": "user", "content": "what is 2 ?"}],
     "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": 1}, "data_source": "t"},
]


def _write_verl(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    return path


def test_chat_prompt_rendered_as_given_without_suffix(hf_tok, tmp_path):
    """A verl parquet's chat prompt goes through the chat template as given: no suffix, system turn kept."""
    from entrl.data.sources import load_records

    recs = load_records(_write_verl(tmp_path / "v.parquet"), id_key="extra_info.index", problem_key="prompt",
                        answer_key="reward_model.ground_truth").records
    tokens, kept, dropped = tokenize_prompts(recs, hf_tok, max_prompt_len=64)  # default suffix: SENT's
    text = "<|im_start|>system\nPlease<|im_end|>\n<|im_start|>user\nwhat is 1 + 2 ?<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(recs[0].prompt, hf_tok) == text
    vocab = hf_tok.hf.get_vocab()
    want = [vocab[w] for w in "<|im_start|> system Please <|im_end|> <|im_start|> user what is 1 + 2 ? <|im_end|> "
            "<|im_start|> assistant".split()]
    assert tokens[0] == want and dropped == 0 and [r.id for r in kept] == ["0", "1"]
    # The plain-text problem of the same record still gets the suffix (today's behaviour).
    assert build_prompt(recs[1].problem, hf_tok).endswith(f"what is 2 ?\n{SENT_SUFFIX}<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"row 0 \(id='0'\): a chat-message prompt needs the tokenizer's chat template"):
        tokenize_prompts(recs, hf_tok, max_prompt_len=64, chat_template=False)


def test_chat_prompt_with_char_tokenizer():
    """The character tokenizer's template joins the turns with newlines and appends `=`."""
    tok = CharTokenizer()
    rec = Record("a", "3+4", "7", messages=({"role": "system", "content": "add"}, {"role": "user", "content": "3+4"}))
    tokens, _, _ = tokenize_prompts([rec], tok, max_prompt_len=32)
    assert tokens == [tok.encode("add\n3+4=")]
    assert tokenize_prompts([Record("b", "3+4", "7")], tok, max_prompt_len=32, suffix="").tokens == [tok.encode("3+4=")]


def test_config_keys_reach_the_prompts(tmp_path):
    """`data.*_key` dotted keys and a TRL JSONL through the training setup's build_records / tokenize."""
    import json

    from entrl import config as C
    from entrl.rl.setup import build_records, tokenize

    base = ["model.tokenizer=char", "data.max_prompt_len=64", "rollout.prompt_buckets=[64]"]
    verl = _write_verl(tmp_path / "v.parquet")
    cfg = C.load_config(None, base + [f"data.train={verl}", "data.problem_key=prompt", "data.id_key=extra_info.index",
                                      "data.answer_key=reward_model.ground_truth"])
    records, _ = build_records(cfg)
    assert [(r.id, r.answer) for r in records] == [("0", "3"), ("1", "2")]
    tok = CharTokenizer()
    tokens, kept = tokenize(cfg, records, tok)
    assert tok.decode(tokens[0]) == "Please\nwhat is 1 + 2 ?=" and tok.decode(tokens[1]) == "what is 2 ?="
    trl = tmp_path / "t.jsonl"
    trl.write_text(json.dumps({"prompt": [{"role": "user", "content": "what is 2 ?"}], "solution": 2.0}) + "\n")
    cfg = C.load_config(None, base + [f"data.train={trl}", "data.problem_key=prompt", "data.id_key=",
                                      "data.answer_key=solution"])
    records, _ = build_records(cfg)
    assert records[0].answer == "2" and tok.decode(tokenize(cfg, records, tok)[0][0]) == "what is 2 ?="
    with pytest.raises(C.ConfigError, match="chat-message prompt needs the tokenizer's chat template"):
        tokenize(C.replace(cfg, **{"data.chat_template": False}), records, tok)
    with pytest.raises(C.ConfigError, match="looks like a verl dataset"):
        build_records(C.load_config(None, base + [f"data.train={verl}"]))


# -- arithmetic task ---------------------------------------------------------


def test_problems_deterministic_and_splits_disjoint():
    task = ArithmeticTask()
    a = task.make_problems(400, seed=0, split="train")
    assert a == task.make_problems(400, seed=0, split="train")
    assert [r.problem for r in a] != [r.problem for r in task.make_problems(400, seed=1, split="train")]
    held = task.make_problems(300, seed=0, split="heldout")
    held1 = task.make_problems(300, seed=1, split="heldout")
    train_texts = {r.problem for r in a} | {r.problem for r in task.make_problems(400, seed=1, split="train")}
    assert not train_texts & ({r.problem for r in held} | {r.problem for r in held1})
    assert len({r.problem for r in a}) == 400  # distinct within a split
    for r in a[:50] + held[:50]:
        assert re.fullmatch(r"[1-9]([-+*][1-9]){1,2}", r.problem)
        assert r.answer == str(eval(r.problem))  # Python's precedence is the reference


def test_problem_budget_error():
    with pytest.raises(ValueError, match="distinct heldout problems"):
        ArithmeticTask(max_operands=2, max_number=3, ops="+").make_problems(50, seed=0, split="heldout")


def _check_steps(solution: str) -> int:
    """Each `a op b=c` step is arithmetically right; returns the boxed value."""
    body, boxed = re.fullmatch(r"(.*) \\boxed\{(-?\d+)\}", solution).groups()
    for step in body.split(","):
        lhs, rhs = step.rsplit("=", 1)
        assert eval(lhs) == int(rhs), step
    assert int(body.split(",")[-1].rsplit("=", 1)[1]) == int(boxed)
    return int(boxed)


def test_worked_solution_examples():
    assert ArithmeticTask.worked_solution("3+4*2") == "4*2=8,3+8=11 \\boxed{11}"
    assert ArithmeticTask.worked_solution("2-9*3") == "9*3=27,2-27=-25 \\boxed{-25}"
    assert ArithmeticTask.worked_solution("5-3+2") == "5-3=2,2+2=4 \\boxed{4}"
    assert ArithmeticTask.worked_solution("7*8") == "7*8=56 \\boxed{56}"
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        ArithmeticTask.worked_solution("3+x")


def test_worked_solutions_correct_and_encodable():
    task = ArithmeticTask(max_operands=4, max_number=12)
    tok = CharTokenizer()
    for r in task.make_problems(300, seed=3, split="train"):
        sol = task.worked_solution(r.problem)
        assert sol.endswith(f"\\boxed{{{r.answer}}}")
        assert _check_steps(sol) == eval(r.problem)
        assert tok.decode(tok.encode(build_prompt(r.problem, tok, suffix="") + sol)) == f"{r.problem}={sol}"


def test_noisy_solution_error_rate():
    task = ArithmeticTask()
    probs = task.make_problems(2000, seed=0, split="train")
    rng = np.random.default_rng(0)
    wrong = 0
    for r in probs:
        sol = task.noisy_solution(r.problem, rng, 0.3)
        boxed = int(re.search(r"\\boxed\{(-?\d+)\}$", sol).group(1))
        wrong += boxed != int(r.answer)
        # The steps are internally consistent except possibly one off-by-1/2 step.
        body = sol.split(" \\boxed")[0]
        errs = [abs(eval(s.rsplit("=", 1)[0]) - int(s.rsplit("=", 1)[1])) for s in body.split(",")]
        assert sum(e > 0 for e in errs) <= 1 and max(errs) <= 2
    assert 0.26 < wrong / len(probs) < 0.34
    assert all(task.noisy_solution(r.problem, rng, 0.0) == task.worked_solution(r.problem) for r in probs[:100])
    with pytest.raises(ValueError, match="error_rate"):
        task.noisy_solution("1+2", rng, 1.5)
