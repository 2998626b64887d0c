"""Hugging Face export and import: parity with `transformers`, lossless round trips, refusals,
and an SFT run's chat format (template and stop token) carried into the export."""

import json
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from sllm.cli import build_parser
from sllm.commands import sampling_params
from sllm.config import ModelConfig, load_config
from sllm.data.prepare import prepare
from sllm.errors import UserError
from sllm.export import check_export, export_run, import_hf, to_transformers
from sllm.infer.chat_template import (
    END_TOKEN,
    SFT_TEMPLATE,
    ChatTemplate,
    Message,
    load_chat_template,
    save_chat_template,
    with_template_tokens,
)
from sllm.infer.engine import stream_tokens
from sllm.model import build_model
from sllm.run import CHECKPOINTS, LATEST, open_run
from sllm.sampling import SamplingParams
from sllm.tokenizer import CharTokenizer, train_word
from sllm.train.trainer import train

from .conftest import random_run
from .test_cli import assert_one_line_error, sllm

CPU = torch.device("cpu")
TEXT = "대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다. The end."


@pytest.fixture(scope="module")
def transformers():
    """The parity tests need `transformers`; export and import themselves do not."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    return export_run(trained_run, tmp_path_factory.mktemp("hf") / "tiny")


def _ids(tokenizer, context: int = 32) -> torch.Tensor:
    """TEXT's first `context` tokens as a batch of one."""
    return torch.tensor([tokenizer.encode(TEXT)[:context]])


def test_transformers_loads_the_export_with_our_logits(transformers, trained_run, exported):
    run = open_run(trained_run, CPU)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    ids = _ids(run.tokenizer)
    with torch.no_grad():
        ours, theirs = run.model(ids), hf_model(ids).logits
    assert ids.size(1) == 32
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_greedy_generation_in_transformers_matches_ours(transformers, trained_run, exported):
    run = open_run(trained_run, CPU)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    prompt = run.tokenizer.encode("대한민국은")
    new_tokens = 32 - len(prompt)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    ours = list(stream_tokens(run.model, prompt, params, eos_id=None, device=CPU))
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=run.tokenizer.pad_id,
        )[0, len(prompt) :].tolist()
    assert theirs == ours


def test_exported_tokenizer_encodes_like_ours(transformers, trained_run, exported):
    ours = open_run(trained_run, CPU).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(exported)
    decomposed = unicodedata.normalize("NFD", "대한민국은")
    for text in (TEXT, decomposed, "법률 제1조 ①항\n\n  spaces<|endoftext|>"):
        assert theirs.encode(text) == ours.encode(text)
        assert fast.encode(text) == ours.encode(text)
    ids = ours.encode(TEXT)
    assert theirs.decode(ids) == ours.decode(ids) == TEXT
    assert theirs.eos_token_id == ours.eos_id
    assert theirs.model_max_length == 32


def test_export_writes_config_generation_config_and_model_card(trained_run, exported):
    names = {p.name for p in exported.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    } <= names
    config = json.loads((exported / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (2, 2, 64, 32)
    assert config["activation_function"] == "gelu_new"
    generation = json.loads((exported / "generation_config.json").read_text())
    run = open_run(trained_run, CPU)
    assert generation["eos_token_id"] == run.tokenizer.eos_id
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())
    assert not (exported / "chat_template.jinja").exists()
    assert generation["top_p"] == run.config.sample.top_p
    card = (exported / "README.md").read_text()
    assert f"{run.checkpoint.meta.tokens_seen:,} tokens seen" in card
    assert f"validation loss {run.checkpoint.meta.val_loss:.4f}" in card
    assert "`constitution.jsonl`" in card


def test_export_then_import_is_lossless(trained_run, exported, tmp_path):
    imported = import_hf(exported, tmp_path / "back")
    original, back = open_run(trained_run, CPU), open_run(imported, CPU)
    ours, theirs = original.model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert back.config.model == original.config.model
    assert back.tokenizer.sha256 == original.tokenizer.sha256
    assert (imported / CHECKPOINTS / LATEST).read_text().strip() == "step-000000"
    ids = _ids(original.tokenizer)
    with torch.no_grad():
        assert torch.equal(back.model(ids), original.model(ids))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pytorch_model.bin"])
def test_imported_random_transformers_gpt2_gives_its_logits(transformers, tokenizer, tmp_path, layout):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=24, n_embd=48, n_layer=3, n_head=4,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
    )  # fmt: skip
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    source = tmp_path / "hf"
    if layout == "safetensors":
        hf_model.save_pretrained(source)
    elif layout == "sharded":
        hf_model.save_pretrained(source, max_shard_size="60KB")
        assert (source / "model.safetensors.index.json").is_file()
    else:  # the old layout: no `transformer.` prefix, causal-mask buffers and the tied head saved
        source.mkdir()
        config.save_pretrained(source)
        state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
        state["h.0.attn.bias"] = torch.ones(1, 1, 24, 24)
        assert "lm_head.weight" in state
        torch.save(state, source / layout)
    tokenizer.save(source)

    run = open_run(import_hf(source, tmp_path / "run"), CPU)
    assert run.config.model.block_size == 24
    ids = _ids(run.tokenizer, 24)
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids), hf_model(ids).logits, atol=1e-5, rtol=0)


def test_imported_run_continues_training_on_new_text(exported, corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = import_hf(exported, Path("runs/imported"))
    steps = ["train.max_steps=3", "train.micro_batch=2", "train.device=cpu", "log.progress=false"]
    steps += ["log.tensorboard=false", "log.samples_at_eval=false", "train.eval_interval=0"]
    cfg = load_config(str(run_dir / "config.yaml"), [f"data.inputs=[{corpus_file}]", *steps])
    assert cfg.data.dir == "data/imported"
    prepare(cfg.data, cfg.tokenizer, log=lambda _: None)
    messages: list[str] = []
    result = train(cfg, log=messages.append)
    assert any(m.startswith("resumed from") and "step 0" in m for m in messages)
    assert result.step == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [("model.arch=ffn", "model.arch is ffn"), ("model.pos=sinusoidal", "model.pos is sinusoidal"),
     ("model.bias=false", "model.bias is False")],
)  # fmt: skip
def test_models_without_an_hf_equivalent_are_refused(tokenizer, tmp_path, override, named):
    run_dir = random_run(tmp_path / "run", tokenizer, override)
    with pytest.raises(UserError, match="no Hugging Face equivalent") as error:
        export_run(run_dir, tmp_path / "hf")
    assert named in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_refusal_is_one_line_on_the_command_line(tokenizer, tmp_path):
    run_dir = random_run(tmp_path / "run", tokenizer, "model.pos=sinusoidal")
    result = sllm("export", "--run", run_dir, "--out", tmp_path / "hf", "--format", "hf")
    assert_one_line_error(result, "no Hugging Face equivalent", "model.pos is sinusoidal")


def test_character_tokenizers_and_non_empty_targets_are_refused(tokenizer, tmp_path):
    chars = CharTokenizer(["<|endoftext|>"], list("가나다"))
    with pytest.raises(UserError, match="character-level tokenizer"):
        export_run(random_run(tmp_path / "char", chars), tmp_path / "hf")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_run(random_run(tmp_path / "run", tokenizer), taken)


def _hf_dir(exported: Path, tmp_path: Path, **config_changes) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for path in exported.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text()) | config_changes
    (source / "config.json").write_text(json.dumps(config))
    return source


@pytest.mark.parametrize(
    ("change", "message"),
    [({"activation_function": "relu"}, "activation_function=relu"),
     ({"model_type": "llama"}, "sllm can import GPT2LMHeadModel"),
     ({"n_layer": 3}, "do not match its config.json"),
     ({"tie_word_embeddings": False}, "tie_word_embeddings=False")],
)  # fmt: skip
def test_imports_that_sllm_cannot_reproduce_are_refused(exported, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        import_hf(_hf_dir(exported, tmp_path, **change), tmp_path / "run")


def test_import_without_tokenizer_json_names_the_fix(exported, tmp_path):
    source = _hf_dir(exported, tmp_path)
    (source / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json; write one with transformers"):
        import_hf(source, tmp_path / "run")


def test_check_reports_agreement_with_transformers(transformers, trained_run, exported):
    assert check_export(trained_run, exported) < 1e-5


def test_check_without_transformers_names_the_extra(trained_run, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match="pip install 'sllm\\[hf\\]'"):
        check_export(trained_run, exported)


LLAMA = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false", "model.n_head=4"]


@pytest.mark.parametrize(
    "options",
    [["model.n_kv_head=2", "model.tie_embeddings=false", "model.vocab_pad_multiple=384"],
     ["model.rope_base=500", "model.mlp_hidden=96"]],
)  # fmt: skip
def test_llama_style_run_exports_as_llama_with_our_logits_and_imports_back(
    transformers, tokenizer, tmp_path, options
):
    run_dir = random_run(tmp_path / "run", tokenizer, *LLAMA, *options)
    exported = export_run(run_dir, tmp_path / "hf")
    run = open_run(run_dir, CPU)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids = _ids(run.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, run.model(ids), atol=1e-5, rtol=0)
    back = open_run(import_hf(exported, tmp_path / "back"), CPU)
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), run.model(ids), atol=0, rtol=0)
    assert back.config.model.n_kv_head in (run.config.model.n_kv_head, run.config.model.n_head)


def test_models_llama_cannot_represent_are_refused_naming_both_families(tokenizer, tmp_path):
    run_dir = random_run(tmp_path / "run", tokenizer, *LLAMA, "model.qk_norm=true")
    with pytest.raises(UserError, match="no Hugging Face equivalent") as error:
        export_run(run_dir, tmp_path / "hf")
    assert "model.qk_norm is True (Llama needs False)" in str(error.value)
    assert "model.pos is rope (GPT-2 needs learned)" in str(error.value)


def test_padded_gpt2_exports_only_the_real_vocabulary(transformers, tokenizer, tmp_path):
    run_dir = random_run(tmp_path / "run", tokenizer, "model.vocab_pad_multiple=384")
    exported = export_run(run_dir, tmp_path / "hf")
    run = open_run(run_dir, CPU)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    assert hf_model.config.vocab_size == tokenizer.vocab_size < run.model.wte.weight.size(0)
    ids = _ids(run.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, run.model(ids), atol=1e-5, rtol=0)


LLAMA_STYLE = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}


@pytest.mark.parametrize(
    "options, hf_class",
    [({}, "GPT2LMHeadModel"), ({"n_kv_head": 4}, "GPT2LMHeadModel"), (LLAMA_STYLE, "LlamaForCausalLM"),
     ({**LLAMA_STYLE, "tie_embeddings": False}, "LlamaForCausalLM")],
)  # fmt: skip
def test_in_memory_transformers_copy_gives_our_logits(transformers, options, hf_class):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=70, n_layer=2, n_head=4, n_embd=32, block_size=24, **options)
    model = build_model(cfg).eval()
    hf_model = to_transformers(model, attn_implementation="sdpa")
    assert type(hf_model).__name__ == hf_class and not hf_model.training
    ids = torch.randint(0, 70, (2, 24))
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max() < 1e-5


def test_in_memory_transformers_copy_of_a_model_without_equivalent_is_a_user_error(transformers):
    model = build_model(
        ModelConfig(vocab_size=70, n_layer=1, n_head=4, n_embd=32, block_size=24, qk_norm=True)
    )
    with pytest.raises(UserError, match="qk_norm"):
        to_transformers(model)
    grouped = build_model(
        ModelConfig(vocab_size=70, n_layer=1, n_head=4, n_embd=32, block_size=24, n_kv_head=2)
    )
    with pytest.raises(UserError, match=r"n_kv_head is 2 \(GPT-2 needs 0 or n_head, 4\)"):
        to_transformers(grouped)


def test_importing_truncated_weights_is_a_user_error(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(UserError, match=r"model\.safetensors is damaged or incomplete"):
        import_hf(broken, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_export_samples_as_sllm_generate_does_on_the_same_run(tokenizer, tmp_path):
    """Both follow the run's `sample` section: the defaults and a configured penalty alike."""
    for name, overrides in (
        ("default", ()),
        ("demo", ("sample.repetition_penalty=1.1", "sample.min_new_tokens=4")),
    ):
        run = random_run(tmp_path / name, tokenizer, *overrides)
        generation = json.loads(
            (export_run(run, tmp_path / f"hf-{name}") / "generation_config.json").read_text()
        )
        used = sampling_params(build_parser().parse_args(["generate", "--run", str(run), "--prompt", "p"]))
        assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (
            used.temperature, used.top_k, used.top_p,
        )  # fmt: skip
        assert generation.get("repetition_penalty", 1.0) == used.repetition_penalty
        assert generation.get("min_new_tokens", 0) == used.min_new_tokens
    assert (used.repetition_penalty, used.min_new_tokens) == (1.1, 4)


CONVERSATION = [
    Message("system", "너는 친절한 도우미다."),
    Message("user", "대한민국의 수도는?"),
    Message("assistant", "서울입니다."),
    Message("user", "그럼 인구는?"),
]


@pytest.fixture(scope="module")
def sft_run(tokenizer, tmp_path_factory) -> Path:
    """A run saved the way `sllm finetune sft` saves one: template tokens, chat_template.json."""
    run_dir = random_run(tmp_path_factory.mktemp("sft") / "run", with_template_tokens(tokenizer))
    save_chat_template(run_dir, SFT_TEMPLATE)
    return run_dir


@pytest.fixture(scope="module")
def sft_export(sft_run, tmp_path_factory) -> Path:
    return export_run(sft_run, tmp_path_factory.mktemp("hf-sft") / "sft")


def _as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def test_sft_export_chat_template_renders_sllms_prompt(transformers, sft_run, sft_export):
    run = open_run(sft_run, CPU)
    ours = load_chat_template(sft_run).render(CONVERSATION)
    assert ours.startswith("<|system|>너는 친절한 도우미다.<|end|><|user|>") and ours.endswith(
        "<|assistant|>"
    )
    theirs = transformers.AutoTokenizer.from_pretrained(sft_export)
    messages = _as_dicts(CONVERSATION)
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours
    closed = theirs.apply_chat_template(messages, tokenize=False)
    assert closed == ours.removesuffix("<|assistant|>")
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == run.tokenizer.encode(ours)
    assert ids.count(run.tokenizer.token_id(END_TOKEN)) == 4


def test_chat_template_in_tokenizer_config_alone_gives_the_same_prompt(transformers, sft_export, tmp_path):
    """transformers 5 reads chat_template.jinja first; tokenizer_config.json serves older readers."""
    jinja = (sft_export / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((sft_export / "tokenizer_config.json").read_text())["chat_template"] == jinja
    legacy = tmp_path / "legacy"
    shutil.copytree(sft_export, legacy)
    (legacy / "chat_template.jinja").unlink()
    theirs = transformers.AutoTokenizer.from_pretrained(legacy)
    prompt = theirs.apply_chat_template(_as_dicts(CONVERSATION), tokenize=False, add_generation_prompt=True)
    assert prompt == SFT_TEMPLATE.render(CONVERSATION)


def test_sft_export_generation_stops_at_the_end_token(transformers, sft_run, sft_export):
    run = open_run(sft_run, CPU)
    eos, end = run.tokenizer.eos_id, run.tokenizer.token_id(END_TOKEN)
    assert json.loads((sft_export / "generation_config.json").read_text())["eos_token_id"] == [eos, end]
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(sft_export).eval()
    with torch.no_grad():  # every position's hidden state becomes <|end|>'s (longest) embedding row
        hf_model.transformer.wte.weight[end] *= 10
        hf_model.transformer.ln_f.weight.zero_()
        hf_model.transformer.ln_f.bias.copy_(hf_model.transformer.wte.weight[end])
        prompt = torch.tensor([run.tokenizer.encode(SFT_TEMPLATE.render(CONVERSATION[1:2]))])
        generated = hf_model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated[0, prompt.size(1) :].tolist() == [end]


def test_sft_model_card_example_prompts_through_the_chat_template(transformers, sft_export, exported, capsys):
    card = (sft_export / "README.md").read_text(encoding="utf-8")
    example = card.split("```python\n")[1].split("```")[0].replace("path/to/this/directory", str(sft_export))
    example = example.replace("max_new_tokens=40", "max_new_tokens=8")  # the test model's context is 32
    assert "apply_chat_template" in example
    assert "apply_chat_template" not in (exported / "README.md").read_text(encoding="utf-8")
    exec(example, {})
    assert capsys.readouterr().out.count("\n") == 1


def test_hand_written_chat_template_exports_character_for_character(transformers, tokenizer, tmp_path):
    template = ChatTemplate(
        system='### 시스템 "{text}"\\n\n',
        user="{{user}}: {text} / {text}\t😀\n",
        assistant="%}} {{% {text}\n",
        reply_prefix="{{- 'bot' -}}:",
    )
    run_dir = random_run(tmp_path / "run", tokenizer)
    save_chat_template(run_dir, template)
    theirs = transformers.AutoTokenizer.from_pretrained(export_run(run_dir, tmp_path / "hf"))
    conversation = [Message("system", "{{ 1 + 1 }} {text} %}"), *CONVERSATION[1:]]
    prompt = theirs.apply_chat_template(_as_dicts(conversation), tokenize=False, add_generation_prompt=True)
    assert prompt == template.render(conversation)
    assert "{{ 1 + 1 }} {text} %}" in prompt  # the content is not read as a template
    assert "{user}: 대한민국의 수도는? / 대한민국의 수도는?\t😀" in prompt


def test_a_stop_string_of_several_tokens_becomes_a_stop_string_of_the_export(tokenizer, tmp_path):
    run_dir = random_run(tmp_path / "run", tokenizer)
    save_chat_template(run_dir, ChatTemplate(stop=("대한민국은",)))
    generation = json.loads((export_run(run_dir, tmp_path / "hf") / "generation_config.json").read_text())
    assert generation["stop_strings"] == ["대한민국은"] and generation["eos_token_id"] == tokenizer.eos_id


def test_a_chat_template_transformers_cannot_follow_is_refused(tokenizer, tmp_path):
    run_dir = random_run(tmp_path / "run", tokenizer)
    save_chat_template(run_dir, ChatTemplate(user="{text!r}"))
    with pytest.raises(UserError, match=re.escape("has a field other than {text}")):
        export_run(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_word_level_run_exports_and_transformers_encodes_decodes_and_scores_alike(transformers, tmp_path):
    from .conftest import constitution_paragraphs

    ours = train_word(iter(constitution_paragraphs()), 300, ["<|endoftext|>", "<|pad|>"])
    out = export_run(random_run(tmp_path / "word", ours), tmp_path / "hf")
    assert check_export(tmp_path / "word", out) < 1e-5
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "모든 국민은 법률이 정한다.뷁<|endoftext|>"
    ids = ours.encode(text)
    assert theirs.encode(text) == ids and ids[-2:] == [ours.token_id("<|unk|>"), ours.eos_id]
    assert theirs.decode(ids) == ours.decode(ids) == "모든 국민은 법률이 정한다 . <|unk|> <|endoftext|>"
    assert theirs.unk_token == "<|unk|>"
