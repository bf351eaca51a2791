"""Masked-diffusion decoding and what every method shares.

  runner.py     the outer loop of every method: prompt checks and encoding, batching, the EOS cut,
                tokens / sequences / wall clock on the meter; `GenerationResult`
  meter.py      the cost meter (forwards, tokens processed, FLOPs, per model role) and progress bars
  state.py      the canvas: prompt + masked generation slots, block bounds
  config.py     `DecodeConfig`, validated on construction
  policies.py   which masked cells to commit: schedule top-k, threshold, factor, local
  propose.py    one step's candidates and confidences (LLaDA's Gumbel sampler) and the policy dispatch
  cache.py      cache strategies: none, Fast-dLLM prefix / dual, dKV-Cache decode / greedy / prefill
  diffusion.py  the block decoder shared by vanilla LLaDA, Fast-dLLM, dKV-Cache and DualDiffusion's drafter
  dream.py      Dream's whole-sequence sampler (origin / maskgit_plus / topk_margin / entropy)
  llada2.py     LLaDA2's block-diffusion sampler (and the row loop SDAR's shares); sdar.py: SDAR's
  fastdllm_v2.py  Fast-dLLM v2's block-diffusion sampler (sub-blocks, AR tokens opening blocks)
  streamer.py   the one hook every decoding loop reports final tokens through (`Streamer`)
  capabilities.py  what a loaded model is: family, shifted logits, mask id, EOS ids, max positions
"""
