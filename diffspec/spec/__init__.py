"""Speculative decoding: drafter, verifier and acceptance rule over one canvas and one cost meter.

core.py: the interfaces and the concrete diffusion drafter / full-forward verifier;
rules.py: DualDiffusion's verification rules; dualdiffusion.py: the DualDiffusion loop and its config.
"""
