"""lm-evaluation-harness model ``deepseek-pretrain``: runs, checkpoints and HF DeepseekV3 directories
on the field's harness (report 4.3/5.x benchmark formats: multiple choice, generation with exact
match, bits per byte).

    deepseek-lm-eval --model deepseek-pretrain --model_args path=RUN_DIR[,tokenizer=DIR,max_length=N,speculative=mtp,ema=true] \
        --tasks arc_easy,hellaswag [--include_path configs/eval] [--batch_size 8] [--output_path DIR]

Registration is on import: importing this module registers the model with lm-eval's registry
(lm-eval 0.4 has no plugin entry point for models, so the bare ``lm_eval`` command cannot see it).
``deepseek-lm-eval`` (this project's console script) and ``python -m launch.lm_eval_model`` are
lm-eval's own command line with the model registered; from Python, ``import launch.lm_eval_model``
and then ``lm_eval.simple_evaluate(model="deepseek-pretrain", model_args=...)``. The model itself
is ``launch.evaluation.lm_eval.DeepSeekPretrainLM``.
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import launch.evaluation.lm_eval  # noqa: F401  (registers deepseek-pretrain with lm-eval on import)
from plugins.errors import ConfigError, ProjectError, run_cli

UNKNOWN_TASKS = "Tasks not found: "  # lm-eval's message for --tasks it cannot match, raised as a bare ValueError


def main() -> int:
    """lm-eval's command line (its arguments) with ``deepseek-pretrain`` registered; an unknown task
    is one line, as every error of this project's commands."""

    def body() -> int:
        try:
            return cli_evaluate() or 0
        except ValueError as error:
            if isinstance(error, ProjectError) or not str(error).startswith(UNKNOWN_TASKS):
                raise
            raise ConfigError(f"--tasks: unknown {str(error)[len(UNKNOWN_TASKS):]} (see `lm-eval ls tasks`; local "
                              "task YAMLs need --include_path DIR)") from None

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
