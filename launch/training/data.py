"""Finding (or, for the embedded default, building) the run's tokenizer and packed data: one
``data.dataset`` or the weighted ``data.sources`` of a mixture (issue 18), each a prepared
directory, a directory of shard directories or a glob, all opened and checked before any work.

With ``data.builtin_corpus: true`` a missing tokenizer/dataset is built once, by rank 0, from the
Python standard library's code and documentation (present on every machine), then cached at
the configured paths; the other ranks wait for it. Its held-out documents per domain (``code``,
``docs``) are built the same way for the ``data.validation`` entries of those names.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch.distributed as dist

from data_pipeline.builtin_corpus import DOMAINS, write_heldout, write_python_corpus
from data_pipeline.catalog import open_prepared, prepared_dirs
from data_pipeline.dataset import DatasetError
from data_pipeline.mixture import MixtureDataset, Source
from launch.config.run_config import RunConfig
from plugins.errors import ConfigError
from tokenizer.load import TokenizerBundle, load_tokenizer_dir


def _prepared(path: str) -> bool:
    directory = Path(path)
    return (directory / "manifest.json").is_file() or glob.has_magic(path) or any(directory.glob("shard-*-of-*"))


def _build_builtin(run: RunConfig, tokenizer_dir: Path, dataset_dir: Path | None, validation: dict[str, Path]) -> None:
    """The embedded tokenizer, training set and the missing held-out sets (validation: no FIM)."""
    from data_pipeline.prepare import main as prepare
    from tokenizer.train import main as train_tokenizer

    corpus = tokenizer_dir.parent / "python-corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    if not corpus.is_file():
        size = write_python_corpus(corpus, run.data.builtin_megabytes)
        print(f"wrote {corpus} ({size / 2**20:.1f} MB of Python standard-library code and documentation)")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        code = train_tokenizer(["--input", str(corpus), "--vocab-size", str(run.model.vocab_size),
                                "--output", str(tokenizer_dir), "--overwrite"])
        if code:
            raise ConfigError(f"{tokenizer_dir}: building the embedded tokenizer failed")
    common = ["--tokenizer", str(tokenizer_dir), "--seq-len", str(run.data.seq_len), "--seed", str(run.train.seed),
              "--overwrite"]
    if dataset_dir is not None and prepare(["--input", str(corpus), "--output", str(dataset_dir), *common]):
        raise ConfigError(f"{dataset_dir}: building the embedded dataset failed")
    for domain, directory in validation.items():
        heldout = tokenizer_dir.parent / f"python-heldout-{domain}.jsonl"
        size = write_heldout(heldout, domain)
        print(f"wrote {heldout} ({size / 2**20:.2f} MB of held-out Python {domain})")
        if prepare(["--input", str(heldout), "--output", str(directory), "--fim-rate", "0", *common]):
            raise ConfigError(f"{directory}: building the embedded validation set failed")


def _open_source(run: RunConfig, key: str, name: str, path: str, weight: float, bundle: TokenizerBundle) -> Source:
    try:
        datasets = open_prepared(prepared_dirs(path), bundle.fingerprint)
    except DatasetError as error:
        raise ConfigError(f"{run.source}: {key}: {error}") from None
    if datasets[0].seq_len != run.data.seq_len:
        raise ConfigError(f"{run.source}: data.seq_len {run.data.seq_len} differs from the dataset's "
                          f"{datasets[0].seq_len} ({key}: {datasets[0].directory}/manifest.json)")
    return Source(name, weight, datasets)


def validating(run: RunConfig) -> bool:
    """A run validates when it names held-out sets and an interval."""
    return bool(run.data.validation) and run.train.eval_interval > 0


def setup_data(run: RunConfig, rank: int) -> tuple[TokenizerBundle, MixtureDataset]:
    tokenizer_dir = Path(run.data.tokenizer)
    no_tokenizer = not (tokenizer_dir / "tokenizer.json").is_file()
    dataset_dir = None if run.data.sources or (_prepared(run.data.dataset) and not no_tokenizer) \
        else Path(run.data.dataset)
    validation = {name: Path(path) for name, path in run.data.validation.items()
                  if validating(run) and not _prepared(path)}
    absent = [tokenizer_dir] if no_tokenizer else []
    absent += ([dataset_dir] if dataset_dir is not None and not no_tokenizer else []) + list(validation.values())
    if absent and not run.data.builtin_corpus:
        raise ConfigError(
            f"{run.source}: data: {absent[0]} is missing; build it with `python -m tokenizer.train` / "
            "`python -m data_pipeline.prepare` or set data.builtin_corpus: true"
        )
    unknown = [name for name in validation if name not in DOMAINS]
    if unknown and run.data.builtin_corpus:
        raise ConfigError(f"{run.source}: data.validation.{unknown[0]}: {validation[unknown[0]]} is missing and the "
                          f"embedded corpus has only the domains {', '.join(DOMAINS)}")
    if absent and rank == 0:
        _build_builtin(run, tokenizer_dir, dataset_dir, validation)
    if dist.is_initialized():
        dist.barrier()
    bundle = load_tokenizer_dir(tokenizer_dir)
    if bundle.vocab_size > run.model.vocab_size:
        raise ConfigError(f"{run.source}: model.vocab_size {run.model.vocab_size} is smaller than the "
                          f"tokenizer's {bundle.vocab_size} tokens ({tokenizer_dir})")
    if run.data.sources:
        sources = [_open_source(run, f"data.sources[{i}]", s.name, s.path, s.weight, bundle)
                   for i, s in enumerate(run.data.sources)]
    else:
        sources = [_open_source(run, "data.dataset", "dataset", run.data.dataset, 1.0, bundle)]
    return bundle, MixtureDataset(sources)


def validation_sets(run: RunConfig, bundle: TokenizerBundle) -> dict[str, MixtureDataset]:
    """``data.validation``'s held-out sets (a directory, shard directories or a glob each), checked
    like the training data before any work."""
    return {name: MixtureDataset([_open_source(run, f"data.validation.{name}", name, path, 1.0, bundle)])
            for name, path in run.data.validation.items()}
