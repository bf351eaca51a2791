"""The published checkpoint directories, reproduced at tiny size, load unchanged.

config.json is the published one (every key, value type, special id and auto_map
entry), with only the size keys shrunk; the vocabulary keeps its real size so the
real special ids stay valid. Weights are sharded bf16 safetensors with an index,
as on the Hub; tokenizer.json holds a byte-level BPE (no merges) plus each
model's special tokens at their real ids, and tokenizer_config.json carries the
chat template and special-token texts. Special ids are checked to come from the
files: changing them in the files changes what the loaders read.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers

from diffspec.models.chat import ChatTemplate, apply_chat_template
from diffspec.models.checkpoint import CheckpointError, load_model
from diffspec.models.dream import DreamConfig, DreamModel, load_dream, save_dream
from diffspec.models.llada import LLaDAConfig, LLaDAModel

# GSAI-ML/LLaDA-8B-Instruct config.json
LLADA_8B_INSTRUCT = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}
# GSAI-ML/LLaDA-1.5: LLaDA-8B-Instruct after VRPO; the same architecture, ids and keys.
LLADA_15 = copy.deepcopy(LLADA_8B_INSTRUCT)
# Dream-org/Dream-v0-Instruct-7B config.json
DREAM_7B = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 152064,
}
LLADA_TINY = {"d_model": 16, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 32}
DREAM_TINY = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 32, "max_window_layers": 2}

LLADA_SPECIALS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                  "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
DREAM_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|beginoftext|>": 151665, "<|mask|>": 151666}
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def added(specials: dict[str, int]) -> list[dict]:
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for t, i in specials.items()]


def write_tokenizer_json(path: Path, specials: dict[str, int]) -> None:
    """A byte-level BPE over the 256 byte symbols (ids 0..255) plus `specials` at their real ids."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(specials)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added(specials),
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }))


def decoder_entries(specials: dict[str, int]) -> dict[str, dict]:
    return {str(d.pop("id")): d for d in added(specials)}


def write_sharded(path: Path, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].to(torch.bfloat16).contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * 2 for t in part.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_llada_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    cfg = {**config, **LLADA_TINY}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(0)
    model = LLaDAModel(LLaDAConfig.from_hf_dict(cfg))
    write_sharded(path, model.state_dict())
    write_tokenizer_json(path, LLADA_SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder_entries(LLADA_SPECIALS), "bos_token": "<|startoftext|>",
        "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return path


def make_dream_dir(path: Path, config: dict = DREAM_7B) -> Path:
    cfg = {**config, **DREAM_TINY}
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.from_hf_dict({"mask_token_id": 151666, "eos_token_id": 151643, **cfg}))
    save_dream(model, None, path, dtype=torch.bfloat16, max_shard_bytes=4_000_000)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))  # exactly the published keys
    write_tokenizer_json(path, DREAM_SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder_entries(DREAM_SPECIALS),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>", "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
        "unk_token": None}, indent=2))
    return path


def shard_state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def llada_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    return {"LLaDA-8B-Instruct": make_llada_dir(root / "llada-8b-instruct", LLADA_8B_INSTRUCT),
            "LLaDA-1.5": make_llada_dir(root / "llada-1.5", LLADA_15)}


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory) -> Path:
    return make_dream_dir(tmp_path_factory.mktemp("real") / "dream-v0-instruct-7b")


@pytest.mark.parametrize("name", ["LLaDA-8B-Instruct", "LLaDA-1.5"])
def test_llada_directory_loads_unchanged(llada_dirs, name):
    path = llada_dirs[name]
    assert len(list(path.glob("model-*.safetensors"))) == 3
    model, tok = load_model(path)  # CPU default: float32
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (126336, 126081, 126081)
    assert cfg.eot_token_id == 126348  # config.json has none; read from the tokenizer's <|eot_id|>
    assert (cfg.vocab_size, cfg.embedding_size) == (126464, 126464)
    assert (cfg.rope_theta, cfg.max_sequence_length) == (500000.0, 4096)
    assert cfg.extra["auto_map"] == LLADA_8B_INSTRUCT["auto_map"] and cfg.extra["torch_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    m16, _ = load_model(path, dtype="bfloat16")
    files = shard_state(path)
    for k, v in m16.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, files[k]), k
    ids = torch.tensor([ChatTemplate.from_pretrained(path).encode(tok, [{"role": "user", "content": "2+2?"}])])
    assert ids[0, 0].item() == 126080  # the template's BOS
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_llada_config_keys_survive_a_round_trip(llada_dirs):
    """LLaDAConfig keeps every published key (unknown ones in `extra`) and writes them back."""
    raw = json.loads((llada_dirs["LLaDA-8B-Instruct"] / "config.json").read_text())
    back = LLaDAConfig.from_hf_dict(raw).to_hf_dict()
    assert {k: back[k] for k in raw} == raw


def test_llada_special_ids_come_from_the_files(llada_dirs, tmp_path):
    path = tmp_path / "moved"
    path.mkdir()
    for f in llada_dirs["LLaDA-1.5"].iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 126335, "eos_token_id": 126080}))
    model, _ = load_model(path)
    assert (model.config.mask_token_id, model.config.eos_token_id) == (126335, 126080)


def test_dream_directory_loads_unchanged(dream_dir):
    assert len(list(dream_dir.glob("model-*.safetensors"))) >= 3
    assert (dream_dir / "model.safetensors.index.json").is_file()
    model, tok = load_dream(dream_dir)  # CPU default: float32
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (151666, 151643, 151643, 151643)
    assert cfg.eot_token_id == 151645  # not in config.json: the tokenizer's <|im_end|>
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (152064, 131072)
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (1e6, 1e-6)
    assert cfg.to_hf_dict() == {**json.loads((dream_dir / "config.json").read_text()), "eot_token_id": 151645}
    m16, _ = load_dream(dream_dir, dtype="bfloat16")
    files = shard_state(dream_dir)
    for k, v in m16.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, files[k]), k
    ids = torch.tensor([ChatTemplate.from_pretrained(dream_dir).encode(tok, [{"role": "user", "content": "2+2?"}])])
    assert ids[0, 0].item() == 151644 and ids[0, -11].item() == 151644
    assert tok.decode(ids[0, -11:].tolist()) == "<|im_start|>assistant\n"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_dream_special_ids_come_from_the_files(tmp_path):
    # ids moved in config.json are what the loader reads
    moved = make_dream_dir(tmp_path / "moved", {**DREAM_7B, "mask_token_id": 151665, "eos_token_id": 151645,
                                                  "pad_token_id": 151645})
    cfg = load_dream(moved)[0].config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (151665, 151645, 151645)
    # no mask / pad id in config.json: tokenizer_config.json's mask_token / pad_token name them
    bare = {k: v for k, v in DREAM_7B.items() if k not in ("mask_token_id", "pad_token_id")}
    cfg = load_dream(make_dream_dir(tmp_path / "bare", bare))[0].config
    assert (cfg.mask_token_id, cfg.pad_token_id) == (151666, 151643)


def test_each_loader_refuses_the_other_architecture(llada_dirs, dream_dir):
    with pytest.raises(CheckpointError, match="LLaDA checkpoint"):
        load_dream(llada_dirs["LLaDA-8B-Instruct"])
    with pytest.raises(CheckpointError, match="not a LLaDA config .*Dream"):
        load_model(dream_dir)


def test_chat_templates_of_the_directories(llada_dirs, dream_dir):
    msgs = [{"role": "user", "content": " What is 2+2? "}]
    assert apply_chat_template(llada_dirs["LLaDA-8B-Instruct"], msgs) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert apply_chat_template(dream_dir, msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n What is 2+2? <|im_end|>\n"
        "<|im_start|>assistant\n")
