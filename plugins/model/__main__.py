"""``python -m plugins.model count CONFIG.yaml [--pp P] [--ep E] [--pipeline-schedule S] [--set model.key=value ...]``:
total, activated and MTP parameter counts of a config, and with a layout the parameters the
most-loaded rank holds, as one JSON line (computed on the meta device: nothing is allocated)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError, run_cli
from .config import ModelConfig
from .param_count import count_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.model", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    count = commands.add_parser("count", help="print {total, activated, mtp, mtp_activated} as one JSON line")
    count.add_argument("config", help="a YAML config with a 'model:' section")
    count.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    count.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    count.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    count.add_argument("--pipeline-schedule", default="dualpipe", choices=["dualpipe", "dualpipev", "1f1b"])
    args = parser.parse_args(argv)

    def body() -> int:
        config = ModelConfig.from_yaml(args.config, args.set)
        counts = count_parameters(config)
        if args.pp > 1 or args.ep > 1:
            counts["per_rank"] = _most_loaded_rank(config, args.pp, args.ep, args.pipeline_schedule)
        print(json.dumps(counts))
        return 0

    return run_cli(body)


def _most_loaded_rank(config: ModelConfig, pp: int, ep: int, schedule: str) -> dict:
    from ..parallel.dualpipe import ScheduleError, check
    from ..parallel.rank_share import rank_parameters

    if pp < 1 or ep < 1:
        raise ConfigError(f"--pp {pp} --ep {ep}: must be positive")
    if config.n_routed_experts % ep:
        raise ConfigError(f"--ep {ep}: does not divide model.n_routed_experts = {config.n_routed_experts}")
    try:
        check(schedule, pp, 2 * pp)
    except ScheduleError as error:
        raise ConfigError(f"--pp {pp} --pipeline-schedule {schedule}: {error}") from None
    ranks = rank_parameters(config, pp, ep, schedule)
    return {"layout": {"pp": pp, "ep": ep, "pipeline_schedule": schedule if pp > 1 else None},
            **max(ranks, key=lambda r: r["parameters"])}


if __name__ == "__main__":
    sys.exit(main())
