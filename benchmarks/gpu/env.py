"""Step 1 of ``run_all.sh``: the versions and the GPU (``results/env.json``)."""

import argparse

import torch
from device import environment, write

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    env = environment()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    write("env", args.dry_run, {"device": env})
