"""SFT: loaders, prompt masking on a hand-made example, packing without leaks, cutting
over-long examples on the prompt side, epoch samples, the CLI run."""

import json
from types import SimpleNamespace

import pytest
import torch

from sllm.errors import UserError
from sllm.finetune.packing import pack
from sllm.finetune.sft import SftConfig, answer_prompts, pack_split, packing_summary
from sllm.finetune.sft_data import Message, load_sft
from sllm.infer.chat_template import (
    END_TOKEN,
    ROLE_TOKENS,
    SFT_TEMPLATE,
    grow_embeddings,
    load_chat_template,
    render,
    render_prompt,
    with_template_tokens,
)
from sllm.infer.engine import TextGenerator
from sllm.run import open_run

from .conftest import SHARED_DATA
from .test_cli import assert_one_line_error
from .test_sts import sllm


def test_the_three_formats_become_conversations(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "더하라", "input": "1, 2", "output": "3"}]), "utf-8")
    chat = tmp_path / "c.jsonl"
    messages = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "안녕"},
                {"role": "assistant", "content": "네"}]  # fmt: skip
    chat.write_text(json.dumps({"messages": messages}) + "\n\n", "utf-8")
    qa = tmp_path / "q.csv"
    qa.write_bytes('Q,A,label\r\n밥 먹었어?,"응, 먹었어",0\r\n빈 답,,1'.encode())
    assert load_sft(alpaca).conversations == [[Message("user", "더하라\n\n1, 2"), Message("assistant", "3")]]
    assert [m.role for m in load_sft(chat).conversations[0]] == ["system", "user", "assistant"]
    data = load_sft(qa)
    assert data.conversations == [[Message("user", "밥 먹었어?"), Message("assistant", "응, 먹었어")]]
    assert data.skipped == ["line 3"]


@pytest.mark.parametrize(
    ("name", "count"),
    [("chatbot_data/ChatbotData.csv", 11823), ("code_alpaca/code_alpaca_2k.json", 2017)],
)
def test_loaders_read_the_shared_files(name, count):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    data = load_sft(path)
    assert len(data.conversations) + len(data.skipped) == count


def test_bad_sft_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "no"}\n', "utf-8")
    with pytest.raises(UserError, match="line 2 is neither Alpaca"):
        load_sft(path)


def test_loss_weights_are_zero_on_the_prompt(tokenizer):
    chat = with_template_tokens(tokenizer)
    conversation = [Message("user", "헌법"), Message("assistant", "국민")]
    ids, weights = render(chat, conversation)
    user, assistant, end = (
        chat.token_id(t) for t in (ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], END_TOKEN)
    )
    question, answer = chat.encode("헌법"), chat.encode("국민")
    assert ids == [user, *question, end, assistant, *answer, end]
    assert weights == [0.0] * (len(question) + 3) + [1.0] * (len(answer) + 1)


def test_the_inference_template_encodes_like_the_training_render(tokenizer):
    chat = with_template_tokens(tokenizer)
    conversation = [Message("system", "짧게"), Message("user", "대한민국의 주권은?")]
    assert chat.encode(SFT_TEMPLATE.render(conversation)) == render_prompt(chat, conversation)


def test_an_over_long_example_loses_its_oldest_prompt_tokens_not_its_answers(tokenizer):
    chat = with_template_tokens(tokenizer)
    conversation = [Message("user", "대한민국 헌법 제1조 " * 10), Message("assistant", "민주공화국"),
                    Message("user", "주권은?"), Message("assistant", "국민에게 있다")]  # fmt: skip
    ids, weights = render(chat, conversation)
    length = len(ids) - 1 - 10  # ten tokens too long, all from the first question
    rows = pack([(ids, weights)], length, chat.pad_id)
    assert rows.inputs[0].tolist() == ids[10:-1] and rows.targets[0].tolist() == ids[11:]
    assert rows.weights[0].tolist() == weights[11:] and sum(weights[11:]) == sum(weights)
    last_answer = [*chat.encode("국민에게 있다"), chat.token_id(END_TOKEN)]
    assert rows.targets[0, -len(last_answer) :].tolist() == last_answer
    assert (rows.cut_prompt, rows.cut_answer, rows.skipped) == (1, 0, 0)


def test_a_closing_turn_after_the_last_answer_goes_before_the_prompt_does():
    """Tokens after the last target train nothing: an over-long example drops them first."""
    ids, weights = list(range(10, 20)), [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    rows = pack([(ids, weights)], 5, 0)
    assert rows.inputs[0].tolist() == ids[:5] and rows.targets[0].tolist() == ids[1:6]
    assert rows.weights[0].tolist() == [0, 0, 1, 1, 1]


def test_an_answer_longer_than_the_row_keeps_its_first_tokens(tokenizer):
    chat = with_template_tokens(tokenizer)
    ids, weights = render(chat, [Message("user", "헌법"), Message("assistant", "대한민국 헌법 제1조 " * 5)])
    answer = weights.index(1.0)
    rows = pack([(ids, weights)], 8, chat.pad_id)
    assert rows.inputs[0].tolist() == ids[answer - 1 : answer + 7]
    assert rows.inputs[0, 0].item() == chat.token_id(ROLE_TOKENS["assistant"])
    assert rows.targets[0].tolist() == ids[answer : answer + 8] and rows.weights[0].tolist() == [1.0] * 8
    assert (rows.cut_prompt, rows.cut_answer, rows.skipped) == (0, 1, 0)


def test_the_summary_counts_cuts_and_skipped_examples():
    prompt_cut = ([1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 1, 1])
    answer_cut = ([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 1, 1, 1])
    fits, no_target = ([8, 9, 10], [0, 1, 1]), ([11, 12, 13], [0, 0, 0])
    train, held_out = pack([prompt_cut, answer_cut, no_target], 4, 0), pack([fits], 4, 0)
    assert packing_summary(train, held_out, 4) == (
        "2 train / 1 held-out examples in 2 / 1 rows of 4 tokens; "
        "2 cut to fit (1 prompt side, 1 answer end), 1 skipped with no answer token"
    )


def test_examples_with_nothing_to_train_on_stop_with_one_line(tmp_path):
    with pytest.raises(UserError, match="has an assistant token to train on"):
        pack_split([([1, 2, 3], [0, 0, 0])], [], 8, 0)
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"instruction": "질문", "output": " "}) + "\n", "utf-8")
    result = sllm("finetune", "sft", "--run", tmp_path, "--data", data, "--out", tmp_path / "sft")
    assert_one_line_error(result, "no example with an assistant answer")


@pytest.mark.parametrize("stops_first", ["eos", "end"])
def test_epoch_samples_stop_at_eos_as_well_as_at_the_end_token(tokenizer, monkeypatch, stops_first):
    chat = with_template_tokens(tokenizer)
    answer = chat.encode("국민에게")
    stops = {"eos": chat.eos_id, "end": chat.token_id(END_TOKEN)}
    other = "end" if stops_first == "eos" else "eos"
    script = [*answer, stops[stops_first], *answer, stops[other]]

    def scripted_stream(model, ids, params, eos_id, device, amp_dtype=None, banned_ids=()):
        """What the engine does: yield the scripted tokens until `eos_id`, not included."""
        for token in script:
            if token == eos_id:
                return
            yield token

    monkeypatch.setattr("sllm.train.samples.stream_tokens", scripted_stream)
    model = SimpleNamespace(block_size=32, training=False, eval=lambda: None, train=lambda mode: None)
    answers = answer_prompts(model, chat, SftConfig(prompts=["주권은?"]), torch.device("cpu"))
    assert answers == [("주권은?", chat.decode(answer))]


def test_template_tokens_are_appended_and_embeddings_grow(trained_run):
    run = open_run(trained_run, torch.device("cpu"))
    chat = with_template_tokens(run.tokenizer)
    assert chat.vocab_size == run.tokenizer.vocab_size + 4
    assert chat.encode("대한민국 헌법") == run.tokenizer.encode("대한민국 헌법")
    old_rows = run.model.wte.weight.detach().clone()
    grow_embeddings(run.model, chat.vocab_size)
    assert run.model(torch.tensor([[chat.vocab_size - 1]])).shape[-1] == chat.vocab_size
    assert torch.equal(run.model.wte.weight[: len(old_rows)], old_rows)


def test_packing_never_lets_one_example_attend_to_another(trained_run):
    model = open_run(trained_run, torch.device("cpu")).model
    examples = [
        ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]),
        ([10, 11, 12], [0, 1, 1]),
        ([13, 14, 15, 16], [0, 0, 0, 1]),
    ]
    rows = pack(examples, length=12, pad_id=0)
    assert len(rows) == 1 and rows.documents[0].tolist() == [0] * 4 + [1] * 2 + [2] * 3 + [3] * 3
    assert rows.targets[0, :4].tolist() == [6, 7, 8, 9] and rows.weights[0].tolist()[:6] == [0, 1, 1, 1, 1, 1]
    packed = model(rows.inputs, document_ids=rows.documents)[0]
    start = 0
    for ids, _ in examples:
        alone = model(torch.tensor([ids[:-1]]))[0]
        assert torch.allclose(packed[start : start + len(ids) - 1], alone, atol=1e-5)
        start += len(ids) - 1
    # the same row without document ids does leak: the second example sees the first
    leaky = model(rows.inputs)[0]
    assert not torch.allclose(leaky[4:6], model(torch.tensor([[10, 11]]))[0], atol=1e-3)


def test_finetune_sft_through_the_cli_makes_a_usable_run(tmp_path, trained_run):
    data = tmp_path / "qa.csv"
    rows = [f"{q},{a}" for q, a in [("대한민국은?", "민주공화국이다"), ("주권은?", "국민에게 있다")] * 10]
    data.write_text("Q,A\n" + "\n".join(rows), "utf-8")
    out = tmp_path / "sft"
    settings = ["sft.epochs=2", "sft.batch_size=2", "sft.lr=1e-3", "sft.val_ratio=0.1", "sft.device=cpu"]
    result = sllm("finetune", "sft", "--run", trained_run, "--data", data, "--out", out, *settings)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_loss" in r]  # an evaluation ends each epoch
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    run = open_run(out, torch.device("cpu"))
    assert run.tokenizer.token_id(ROLE_TOKENS["assistant"]) is not None
    assert run.model.wte.weight.shape[0] == run.tokenizer.vocab_size
    samples = sorted((out / "samples").glob("*.md"))
    assert len(samples) == 2 and "대한민국의 수도는?" in samples[-1].read_text(encoding="utf-8")
    assert_one_line_error(sllm("finetune", "sft", "--run", trained_run, "--data", data, "--out", out),
                          "already holds checkpoints of a fine-tuning with other settings")  # fmt: skip
    # generate and chat format the prompt with the run's template and stop at <|end|>
    assert load_chat_template(out).reply_prefix == ROLE_TOKENS["assistant"]
    answer = sllm(
        "generate", "--run", out, "--prompt", "대한민국은?", "--temperature", "0", "--max-new-tokens", "30"
    )
    assert answer.returncode == 0, answer.stderr
    assert not answer.stdout.startswith("대한민국은?") and "<|end|>" not in answer.stdout
    rendered = SFT_TEMPLATE.render([Message("user", "대한민국은?")])
    expected = TextGenerator.from_run(out, device="cpu").generate(
        rendered, temperature=0, max_new_tokens=30, stop=("<|end|>",)
    )
    assert answer.stdout == expected + "\n"


def test_over_long_examples_train_on_their_answers_through_the_cli(tmp_path, trained_run):
    data = tmp_path / "long.jsonl"
    record = json.dumps({"instruction": "질문 " * 200, "output": "답 " * 5}, ensure_ascii=False)
    data.write_text((record + "\n") * 6, "utf-8")
    out = tmp_path / "sft"
    settings = [
        "sft.epochs=1",
        "sft.batch_size=2",
        "sft.val_ratio=0.34",
        "sft.max_new_tokens=4",
        "sft.device=cpu",
    ]
    result = sllm("finetune", "sft", "--run", trained_run, "--data", data, "--out", out, *settings)
    assert result.returncode == 0, result.stderr
    assert (
        "4 train / 2 held-out examples in 4 / 2 rows of 32 tokens; "
        "6 cut to fit (6 prompt side, 0 answer end), 0 skipped with no answer token"
    ) in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (loss,) = [r["loss"] for r in records if "loss" in r]
    (val_loss,) = [r["val_loss"] for r in records if "val_loss" in r]
    assert loss > 0.1 and val_loss > 0.1
