"""Sample prompts follow the data: a config's own prompts belong to its own data.dir; other
data, or a config without prompts, samples the first words of the first validation documents."""

import re

import numpy as np
import pytest

from sllm.cli import main
from sllm.config import load_config
from sllm.data.meta import DataMeta
from sllm.data.verify import open_split
from sllm.tokenizer import load_tokenizer
from sllm.train.samples import OPENING_TOKENS, opening_prompts

DEMO_PROMPTS = ["대한민국은", "국회는", "이 법은"]


@pytest.mark.parametrize(
    ("overrides", "prompts"),
    [
        ([], DEMO_PROMPTS),
        (["data.dir=./data/demo/"], DEMO_PROMPTS),  # the same directory, spelled otherwise
        (["data.dir=data/nsmc"], []),
        (["data.dir=data/nsmc", "sample.prompts=[가, 나]"], ["가", "나"]),
        (["sample.prompts=[가]", "data.dir=data/nsmc"], ["가"]),
    ],
)
def test_a_configs_prompts_stay_with_its_own_data(overrides, prompts):
    assert load_config("demo", overrides).sample.prompts == prompts


@pytest.mark.parametrize(
    ("child", "prompts"),
    [
        ("base: demo\ntrain:\n  max_steps: 3\n", DEMO_PROMPTS),
        ("base: demo\ndata:\n  dir: data/nsmc\n", []),
        ("base: demo\ndata:\n  dir: data/nsmc\nsample:\n  prompts: [가]\n", ["가"]),
    ],
)
def test_a_base_configs_prompts_stay_with_its_data(tmp_path, child, prompts):
    (tmp_path / "child.yaml").write_text(child, encoding="utf-8")
    assert load_config(str(tmp_path / "child.yaml")).sample.prompts == prompts


def test_a_config_without_prompts_or_data_dir_keeps_its_default(tmp_path):
    (tmp_path / "c.yaml").write_text("sample:\n  prompts: [가]\n", encoding="utf-8")
    assert load_config(str(tmp_path / "c.yaml"), ["data.dir=x"]).sample.prompts == ["가"]
    assert load_config(None, ["data.dir=x"]).sample.prompts == []


def _documents(prepared_dir, split: str) -> list[list[int]]:
    """The split's documents as token lists, cut at each EOS: the reference."""
    tokens = open_split(prepared_dir, split, DataMeta.read(prepared_dir)).tolist()
    eos = load_tokenizer(prepared_dir).eos_id
    documents, current = [], []
    for token in tokens:
        if token == eos:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return documents


def test_opening_prompts_are_the_first_words_of_the_first_documents(prepared_dir):
    tokenizer = load_tokenizer(prepared_dir)
    val = open_split(prepared_dir, "val", DataMeta.read(prepared_dir))
    expected = [" ".join(tokenizer.decode(doc).split()[:3]) for doc in _documents(prepared_dir, "val")[:3]]
    assert opening_prompts(val, tokenizer) == expected and len(set(expected)) == 3
    assert opening_prompts(val, tokenizer, count=2, words=1) == [e.split()[0] for e in expected[:2]]


def test_a_word_cut_by_the_tokens_read_is_left_out(tokenizer):
    ids = tokenizer.encode("대한민국은 민주공화국이다 " * 20)  # one document, longer than what is read
    (prompt,) = opening_prompts(np.array(ids), tokenizer, words=100)
    assert set(prompt.split()) == {"대한민국은", "민주공화국이다"}
    assert prompt.split() == tokenizer.decode(ids[:OPENING_TOKENS]).split()[:-1]


def test_training_the_demo_config_on_other_data_samples_that_datas_openings(prepared_dir, tmp_path):
    run = tmp_path / "run"
    small = ["model.n_layer=1", "model.n_embd=32", "model.block_size=32", "sample.max_new_tokens=2"]
    brief = ["train.max_steps=2", "train.eval_interval=2", "train.eval_windows=2", "log.tensorboard=false"]
    main(["train", "--config", "demo", "--data", str(prepared_dir), "--out", str(run), "train.device=cpu",
          *brief, *small])  # fmt: skip
    written = (run / "samples" / "step-000002.md").read_text(encoding="utf-8")
    prompts = re.findall(r"^\*\*(.*?)\*\*", written, re.M)
    val = open_split(prepared_dir, "val", DataMeta.read(prepared_dir))
    assert prompts == opening_prompts(val, load_tokenizer(prepared_dir)) and "대한민국은" not in prompts
