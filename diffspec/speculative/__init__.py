"""Speculative decoding: a drafter proposes, the target / verifier checks, a rule decides.

Masked-diffusion verifiers:
  core.py           the diffusion drafter, the full-forward verifier and the verifier views
                    (used by DualDiffusion)
  rules.py          DualDiffusion's verification rules
  dualdiffusion.py  the DualDiffusion loop and its config
  psd.py            PSD: nested drafts from one ranking, one batched verification
AR targets:
  ar.py             AR greedy / sampling and classic speculative decoding (AR drafter)
  tree.py           D²SD's rejection-boundary posterior, draft trees, tree attention, the acceptance walk
  d2sd.py           DFlash (one block draft, chain verification) and D²SD (re-anchored branches, tree
                    verification)
  armethods.py      the AR-target methods' config (target + drafter paths) and their dispatch
"""
