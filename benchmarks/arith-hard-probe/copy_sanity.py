"""Sanity check for the probe: can our masked-diffusion training learn to copy a name at all?

    python benchmarks/arith-hard-probe/copy_sanity.py

A 2-layer, width-128 LLaDA model, trained with `mdm_loss` on a pure copy task in arith-hard's
format (three people, three numbered "buys" events; the answer repeats each event's number, name
and amount), and the probe's masked-name accuracy every 100 steps. If this stayed at chance, the
training code (masking, attention to the prompt) would be broken; it does not.
"""
import random

import torch

torch.manual_seed(0)
torch.set_num_threads(1)
from diffspec.models.checkpoint import load_tokenizer, DEFAULT_MODEL_DIR
from diffspec.models.llada import LLaDAConfig, LLaDAModel
from diffspec.train.mdm import mdm_loss, MDMBatcher, MASK_TOKEN, EOS_TOKEN
from diffspec.tasks.arith import NAMES, ITEMS
tok = load_tokenizer(DEFAULT_MODEL_DIR)
mask_id, eos_id = tok.token_to_id(MASK_TOKEN), tok.token_to_id(EOS_TOKEN)
cfg = LLaDAConfig(d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256, vocab_size=tok.vocab_size,
                  mask_token_id=mask_id, eos_token_id=eos_id, max_sequence_length=256)
model = LLaDAModel(cfg)
rng = random.Random(0)
def ex():
    ppl = rng.sample(NAMES, 3); item = rng.choice(ITEMS); ev = [(rng.choice(ppl), rng.randint(2, 9)) for _ in range(3)]
    q = " ".join(f"{p} has {rng.randint(10,40)} {item}." for p in ppl) + " " + " ".join(f"({k+1}) {p} buys {n} more." for k, (p, n) in enumerate(ev))
    a = "\n".join(f"({k+1}) {p}: +{n}" for k, (p, n) in enumerate(ev))
    return tok.encode("Question: " + q + "\nAnswer:"), tok.encode(" " + a) + [eos_id] * 4
items = [ex() for _ in range(20000)]
b = MDMBatcher(items, 32, eos_id, 0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
name_ids = {tok.encode(" " + x)[-1] for x in NAMES}
def probe():
    model.eval(); hit = tot = 0
    for _ in range(30):
        p, a = ex()
        for j, t in enumerate(a):
            if t in name_ids:
                x = torch.tensor([p + a]); x[0, len(p) + j] = mask_id
                with torch.no_grad():
                    o = model(x); lg = o.logits if hasattr(o, 'logits') else o
                hit += int(lg[0, len(p) + j].argmax() == t); tot += 1
    model.train(); return hit / tot
for step in range(1, 601):
    ids, ans, att = b.next()
    loss = mdm_loss(model, ids, ans, att, mask_id)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        print(step, round(loss.item(), 3), 'name acc', round(probe(), 2), flush=True)
