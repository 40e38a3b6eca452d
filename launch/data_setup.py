"""Finding (or, for the embedded default, building) the run's tokenizer and packed data: one
``data.dataset`` or the weighted ``data.sources`` of a mixture (issue 18), each a prepared
directory, a directory of shard directories or a glob, all opened and checked before any work.

With ``data.builtin_corpus: true`` a missing tokenizer/dataset is built once, by rank 0, from the
Python standard library's code and documentation (present on every machine), then cached at
the configured paths; the other ranks wait for it.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch.distributed as dist

from data_pipeline.builtin_corpus import write_python_corpus
from data_pipeline.catalog import open_prepared, prepared_dirs
from data_pipeline.dataset import DatasetError
from data_pipeline.mixture import MixtureDataset, Source
from plugins.errors import ConfigError
from tokenizer.load import TokenizerBundle, load_tokenizer_dir

from .config import RunConfig


def _build_builtin(run: RunConfig, tokenizer_dir: Path, dataset_dir: Path) -> None:
    from data_pipeline.prepare import main as prepare
    from tokenizer.train import main as train_tokenizer

    corpus = dataset_dir.parent / "python-corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    if not corpus.is_file():
        size = write_python_corpus(corpus, run.data.builtin_megabytes)
        print(f"wrote {corpus} ({size / 2**20:.1f} MB of Python standard-library code and documentation)")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        code = train_tokenizer(["--input", str(corpus), "--vocab-size", str(run.model.vocab_size),
                                "--output", str(tokenizer_dir), "--overwrite"])
        if code:
            raise ConfigError(f"{tokenizer_dir}: building the embedded tokenizer failed")
    code = prepare(["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len", str(run.data.seq_len),
                    "--output", str(dataset_dir), "--seed", str(run.train.seed), "--overwrite"])
    if code:
        raise ConfigError(f"{dataset_dir}: building the embedded dataset failed")


def _open_source(run: RunConfig, key: str, name: str, path: str, weight: float, bundle: TokenizerBundle) -> Source:
    try:
        datasets = open_prepared(prepared_dirs(path), bundle.fingerprint)
    except DatasetError as error:
        raise ConfigError(f"{run.source}: {key}: {error}") from None
    if datasets[0].seq_len != run.data.seq_len:
        raise ConfigError(f"{run.source}: data.seq_len {run.data.seq_len} differs from the dataset's "
                          f"{datasets[0].seq_len} ({key}: {datasets[0].directory}/manifest.json)")
    return Source(name, weight, datasets)


def setup_data(run: RunConfig, rank: int) -> tuple[TokenizerBundle, MixtureDataset]:
    tokenizer_dir, dataset_dir = Path(run.data.tokenizer), Path(run.data.dataset)
    if run.data.sources:
        missing = not (tokenizer_dir / "tokenizer.json").is_file()
    else:
        prepared = (dataset_dir / "manifest.json").is_file() or glob.has_magic(run.data.dataset) or \
            any(dataset_dir.glob("shard-*-of-*"))
        missing = not prepared or not (tokenizer_dir / "tokenizer.json").is_file()
    if missing and not run.data.builtin_corpus:
        absent = tokenizer_dir if not (tokenizer_dir / "tokenizer.json").is_file() else dataset_dir
        raise ConfigError(
            f"{run.source}: data: {absent} is missing; build it with `python -m tokenizer.train` / "
            "`python -m data_pipeline.prepare` or set data.builtin_corpus: true"
        )
    if missing and rank == 0:
        _build_builtin(run, tokenizer_dir, dataset_dir)
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
