"""Evaluation: accuracy and cost of a method on a task, and the lm-evaluation-harness bridge.

- `evaluate`: `diffspec eval`'s engine (task configs, sharding, generation and likelihood scoring).
- `likelihood`: log-likelihoods of continuations (exact for AR targets, LLaDA's MC ELBO otherwise).
- `flexible`: which tasks report a flexible-match accuracy beside the strict one.
- `harness_model` / `harness`: diffspec as an lm-eval model, and `python -m diffspec.evaluation.harness`
  (lm-eval's own CLI with that model registered); `harness_tasks/` holds the offline task folder.
  Nothing here is named `lm_eval`, so no module shadows the lm-eval package.

The package sits on the top floor beside `api`, `bench`, `serve` and `cli`: it imports the methods
and the floors below them, and `bench`, `serve` and `cli` import it, never the reverse. This file
imports nothing, so reaching `flexible` does not load torch.
"""
