"""`python -m diffspec.evaluation.harness ARGS`: lm-evaluation-harness's own CLI with the `diffspec` model registered.

lm-eval 0.4.x has no plugin entry point for models, so this module imports `diffspec.evaluation.harness_model`
(whose `@register_model("diffspec")` registers it) and then hands the command line to lm-eval's
`cli_evaluate`. diffspec's offline task folder (`diffspec/evaluation/harness_tasks`: arith, arith_mc,
gsm8k_local, mmlu_local) is added to `--include_path` unless the command already names one, as a
copy whose local data paths point at `tasks.default_data_dir()` ($DIFFSPEC_DATA or the
../shared/data it finds), so the command works from any directory.

    python -m diffspec.evaluation.harness --model diffspec --model_args method=vanilla --tasks arith \\
        --device cpu --batch_size 32 --limit 100

A bad model_arg (unknown option, bad value, missing checkpoint) ends with one
`diffspec.evaluation.harness: error: ...` line and exit status 2.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        from .harness_model import INSTALL_HINT

        print(f"diffspec.evaluation.harness: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from .harness_model import ModelArgsError, check_local_data, local_tasks_dir  # registers `diffspec`

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) > 1 and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
            check_local_data(_tasks_arg(args))
            args += ["--include_path", str(local_tasks_dir())]
        sys.argv = [sys.argv[0] if sys.argv else "lm_eval", *args]
        cli_evaluate()
    except ModelArgsError as e:
        print(f"diffspec.evaluation.harness: error: {e}", file=sys.stderr)
        return 2
    return 0


def _tasks_arg(args: list[str]) -> str:
    """The value of --tasks (either spelling), or ''."""
    for i, a in enumerate(args):
        if a.startswith("--tasks="):
            return a.split("=", 1)[1]
        if a == "--tasks" and i + 1 < len(args):
            return args[i + 1]
    return ""

if __name__ == "__main__":
    sys.exit(main())
