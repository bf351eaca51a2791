"""Why step-level batching cannot halve latency on this CPU: one forward's cost against its rows.

    OMP_NUM_THREADS=1 python benchmarks/serve-step-cpu/forward_cost.py

One full bidirectional forward of the bundled model (what vanilla runs every step, and what the
dual cache runs at every block start) on a canvas of 96 columns (arith prompts are 40-60 tokens,
padded, plus 48 answer cells), B = 1, 2, 4, 8, 16 rows, one thread, median of 7 after 2 warm-ups.
If a forward of B rows costs about B times one row's, a request that joins a running batch makes
every forward of that batch slower by its share: it stops waiting, but everyone decodes slower.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_model


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_model(DEFAULT_MODEL_DIR)
    model.eval()
    rows = []
    for B in (1, 2, 4, 8, 16):
        x = torch.randint(5, model.config.vocab_size, (B, 96))
        times = []
        with torch.inference_mode():
            for i in range(9):
                t0 = time.perf_counter()
                model(x)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        rows.append({"rows": B, "ms": 1000 * statistics.median(times)})
    one = rows[0]["ms"]
    print("| rows | forward (ms) | × one row | per row (ms) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['ms']:.1f} | {r['ms'] / one:.2f} | {r['ms'] / r['rows']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
