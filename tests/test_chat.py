"""Chat templates: our jinja2 rendering equals transformers' `apply_chat_template`, text and ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from diffspec.models.chat import (ChatTemplate, ChatTemplateError, apply_chat_template, load_chat_template,
                                  render_chat_template)
from diffspec.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = {"<|startoftext|>": 300, "<|endoftext|>": 301, "<|eot_id|>": 302, "<|start_header_id|>": 303,
            "<|end_header_id|>": 304, "<|im_start|>": 305, "<|im_end|>": 306, "<s>": 307, "</s>": 308}

LLADA = (  # LLaDA-8B-Instruct's (Llama-3's) template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = (  # Dream / Qwen2 ChatML
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA2 = (  # Llama-2-chat's template: roles must alternate (raise_exception)
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
BLOCKS = """{# a multi-line template: trim_blocks / lstrip_blocks decide its whitespace #}
{% for message in messages %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] }}
    {% else %}
{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:{% endif %}"""

TEMPLATES = {
    "llada": (LLADA, {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}),
    "dream-chatml": (CHATML, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    "qwen-tools": (QWEN_TOOLS, {"eos_token": "<|im_end|>"}),
    "llama2": (LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"}),
    "blocks": (BLOCKS, {"eos_token": "</s>"}),
}
CONVERSATIONS = [
    [{"role": "user", "content": "  What is 12 + 7?  "}],
    [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Ünïcode & <b>tags</b> \"q\""}],
]


def write_tokenizer(path: Path) -> Path:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(SPECIALS)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in SPECIALS.items()],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []}}))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def hf_tokenizer(tok_dir: Path, template: str, specials: dict[str, str]):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                                chat_template=template, **specials)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_transformers(tok_dir, tmp_path, name, conv, gen):
    template, specials = TEMPLATES[name]
    messages = CONVERSATIONS[conv]
    hf = hf_tokenizer(tok_dir, template, specials)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    # from a checkpoint directory's tokenizer_config.json, as the published checkpoints store it
    d = write_tokenizer(tmp_path / "ckpt")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **specials,
                                                          "tokenizer_class": "PreTrainedTokenizerFast"}))
    chat = ChatTemplate.from_pretrained(d)
    assert chat.render(messages, add_generation_prompt=gen) == want
    assert render_chat_template(template, messages, add_generation_prompt=gen, special_tokens=specials) == want
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert chat.encode(Tokenizer.from_file(d / "tokenizer.json"), messages, add_generation_prompt=gen) == list(ids)


def test_tools_are_rendered_with_transformers_tojson(tok_dir):
    template, specials = TEMPLATES["qwen-tools"]
    tools = [{"type": "function", "function": {"name": "add", "description": "Add <a> & b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    want = hf_tokenizer(tok_dir, template, specials).apply_chat_template(
        CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True)
    got = render_chat_template(template, CONVERSATIONS[0], add_generation_prompt=True, tools=tools,
                               special_tokens=specials)
    assert got == want and '"Add <a> & b"' in got  # no HTML escaping, as transformers' tojson


def test_raise_exception_refuses_like_transformers(tok_dir):
    template, specials = TEMPLATES["llama2"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer(tok_dir, template, specials).apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat_template(template, bad, special_tokens=specials)


def test_unset_special_token_renders_as_empty_like_transformers(tok_dir):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    want = hf_tokenizer(tok_dir, template, {"eos_token": "</s>"}).apply_chat_template(
        CONVERSATIONS[0], tokenize=False)
    assert render_chat_template(template, CONVERSATIONS[0], special_tokens={"bos_token": None}) == want


def test_template_files_transformers_saves(tok_dir, tmp_path):
    """transformers >= 4.43 writes chat_template.jinja; older checkpoints keep it in tokenizer_config.json."""
    hf = hf_tokenizer(tok_dir, CHATML, {"eos_token": "<|endoftext|>"})
    hf.save_pretrained(tmp_path / "saved")
    assert load_chat_template(tmp_path / "saved") == CHATML
    assert apply_chat_template(tmp_path / "saved", "Hi") == hf.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": CHATML}, {"name": "tool_use", "template": QWEN_TOOLS}]}))
    assert load_chat_template(named) == CHATML and load_chat_template(named, "tool_use") == QWEN_TOOLS
    with pytest.raises(ChatTemplateError, match="none named 'rag'"):
        load_chat_template(named, "rag")


def test_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_pretrained(tmp_path)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="messages must be a list"):
        render_chat_template(CHATML, "hello")
    with pytest.raises(ChatTemplateError, match="failed to render"):  # the sandbox holds
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0])
