"""The shared outer loop (`decoding/runner.py`) that every method's prompts go through."""
from types import SimpleNamespace

import pytest
import torch

from diffspec.api import build_config
from diffspec.decoding.meter import CostMeter
from diffspec.decoding.runner import cut_at_eos, encode_prompts, eos_ids, max_positions, run_prompts


class CharTok:
    """ids = code points minus 96 ('a' = 1); id 0 and 9 never come from text."""

    vocab_size = 40

    def encode(self, text):
        return [ord(c) - 96 for c in text if c.isalpha()]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 96) for i in ids)


class Fake(torch.nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=40, **cfg)


def test_cut_and_eos_ids():
    assert cut_at_eos([3, 4, 9, 5, 9], {9}) == [3, 4]
    assert cut_at_eos([3, 4], {9}) == [3, 4]
    assert cut_at_eos([0, 3], {9, 0}) == []
    assert eos_ids(Fake(eos_token_id=[2, 7])) == {2, 7}
    assert eos_ids(Fake(eos_token_id=2, eos_token_ids=(2, 5))) == {2, 5}
    assert max_positions(Fake(max_sequence_length=64)) == 64
    assert max_positions(Fake(max_position_embeddings=32)) == 32
    with pytest.raises(ValueError, match="no max_position_embeddings"):
        max_positions(Fake())


def test_encode_refuses_with_one_message():
    tok = CharTok()
    assert encode_prompts(tok, ["ab", "c"], 4, 40, 10) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        encode_prompts(tok, ["ab", " "], 4, 40, 10)
    with pytest.raises(ValueError, match="prompt 0 encodes to no tokens"):
        encode_prompts(tok, ["12"], 4, 40, 10)
    with pytest.raises(ValueError, match="embeds only 20 tokens"):
        encode_prompts(tok, ["zz"], 4, 20, 10)
    # the longest offender is named, with how many do not fit
    with pytest.raises(ValueError, match=r"prompt 2 \(8 tokens\) \+ gen_length 4 exceeds the model's 10 positions"
                                         r".*2 of 3 prompts do not fit"):
        encode_prompts(tok, ["abcdefg", "a", "abcdefgh"], 4, 40, 10)


def test_run_prompts_batches_cuts_and_counts():
    model = Fake(max_sequence_length=64, eos_token_id=9)
    seen = []

    def decode(batch):  # no streamer given: decode(batch), as before the hook
        seen.append(len(batch))
        return [ids[:1] + [9, 9] for ids in batch]  # echo the first prompt token, then EOS fill

    meter = CostMeter()
    ids, texts, raw = run_prompts(model, CharTok(), ["ab", "cd", "ef"], decode, gen_length=3, batch_size=2,
                                  meter=meter, desc="t")
    assert seen == [2, 1]
    assert ids == [[1], [3], [5]] and texts == ["a", "c", "e"]
    assert raw == [[1, 9, 9], [3, 9, 9], [5, 9, 9]]
    assert meter.sequences == 3 and meter.tokens_generated == 6  # each answer through its first EOS
    ids, _, _ = run_prompts(model, CharTok(), ["ab"], decode, gen_length=3, batch_size=2, meter=CostMeter(),
                            desc="t", cut=False)
    assert ids == [[1, 9, 9]]


def test_run_prompts_hands_each_batch_the_streamer_from_its_first_row_and_stops_when_told():
    from diffspec.decoding.streamer import Streamer

    class Stop(Streamer):
        def __init__(self):
            self.heard = []

        def on_commit(self, row, positions, token_ids):
            self.heard.append((row, list(positions), list(token_ids)))

        def should_stop(self):
            return len(self.heard) >= 3  # after the second batch

    def decode(batch, streamer):
        for i, ids in enumerate(batch):
            streamer.on_commit(i, [0], ids[:1])
        return [ids[:1] + [9] for ids in batch]

    model, stop = Fake(max_sequence_length=64, eos_token_id=9), Stop()
    ids, texts, raw = run_prompts(model, CharTok(), ["ab", "cd", "ef", "gh", "ij"], decode, gen_length=2,
                                  batch_size=2, meter=CostMeter(), desc="t", streamer=stop)
    assert stop.heard == [(0, [0], [1]), (1, [0], [3]), (2, [0], [5]), (3, [0], [7])]  # rows offset per batch
    assert raw == [[1, 9], [3, 9], [5, 9], [7, 9], []] and ids[4] == [] and texts[4] == ""  # never decoded


def test_one_budget_name_for_ar_methods():
    assert build_config("ar", max_new_tokens=12).gen_length == 12
    assert build_config("ar-spec", gen_length=12, max_new_tokens=12).gen_length == 12
    with pytest.raises(ValueError, match="name one budget"):
        build_config("ar", gen_length=10, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"max_new_tokens \(gen_length\) must be >= 1"):
        build_config("ar", max_new_tokens=0)
