"""``python -m plugins.model count CONFIG.yaml [--set model.key=value ...]``: total, activated and
MTP parameter counts of a config, as one JSON line (computed on the meta device)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import run_cli
from .config import ModelConfig
from .param_count import count_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.model", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    count = commands.add_parser("count", help="print {total, activated, mtp, mtp_activated} as one JSON line")
    count.add_argument("config", help="a YAML config with a 'model:' section")
    count.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)

    def body() -> int:
        print(json.dumps(count_parameters(ModelConfig.from_yaml(args.config, args.set))))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
