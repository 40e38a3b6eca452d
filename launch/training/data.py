"""Finding (or, for the embedded default, building) the run's tokenizer and packed data: one
``data.dataset`` or the weighted ``data.sources`` of a mixture (issue 18), each a prepared
directory, a directory of shard directories or a glob, all opened and checked before any work.

With ``data.builtin_corpus: true`` a missing tokenizer/dataset is built once, by rank 0, from the
Python standard library's code and documentation (present on every machine), then cached at
the configured paths; the other ranks wait for it. Its held-out documents per domain (``code``,
``docs``) are built the same way for the ``data.validation`` entries of those names. It builds
only inside its cache directory, the one holding ``data.tokenizer`` (and the corpus text), only in
directories named ``packed`` (the training set) or after their domain (a held-out set), and only
with its own tokenizer: any other missing path is an error as without ``builtin_corpus`` (a typo
in ``data.dataset`` must not train on the standard library), and it replaces no prepared directory
it did not build.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch.distributed as dist

from data_pipeline.builtin_corpus import DOMAINS, write_heldout, write_python_corpus
from data_pipeline.catalog import open_prepared, prepared_dirs
from data_pipeline.dataset import DatasetError
from data_pipeline.layout import MANIFEST
from data_pipeline.mixture import MixtureDataset, Source
from launch.config.run_config import RunConfig
from plugins.errors import ConfigError
from tokenizer.load import TokenizerBundle, load_tokenizer_dir

CORPUS = "python-corpus.jsonl"  # the embedded corpus's text, beside the tokenizer built from it
HELDOUT = "python-heldout-"  # + domain + .jsonl: its held-out documents
PACKED = "packed"  # the one name of a training set the embedded corpus builds (a held-out set: its domain)


def _prepared(path: str) -> bool:
    directory = Path(path)
    return (directory / "manifest.json").is_file() or glob.has_magic(path) or any(directory.glob("shard-*-of-*"))


def _build_builtin(run: RunConfig, tokenizer_dir: Path, dataset_dir: Path | None, validation: dict[str, Path]) -> None:
    """The embedded tokenizer, training set and the missing held-out sets (validation: no FIM)."""
    from data_pipeline.prepare import main as prepare
    from tokenizer.train import main as train_tokenizer

    corpus = tokenizer_dir.parent / CORPUS
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
        heldout = tokenizer_dir.parent / f"{HELDOUT}{domain}.jsonl"
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


def _inside(path: Path, directory: Path) -> bool:
    return directory.resolve() in path.resolve().parents


def _built_by_embedded(path: str, cache: Path) -> bool:
    """A prepared directory in the cache that the embedded corpus built (its one input is the corpus
    text or a held-out file): one a new embedded tokenizer may replace. Nothing else is replaced."""
    try:
        inputs = json.loads((Path(path) / MANIFEST).read_text()).get("inputs", [])
    except (OSError, ValueError):
        return False
    name = Path(inputs[0]).name if len(inputs) == 1 else ""
    return _inside(Path(path), cache) and (name == CORPUS or name.startswith(HELDOUT))


def _check_buildable(run: RunConfig, missing: dict[str, Path], kept: list[str], tokenizer_dir: Path) -> None:
    """What is missing may be built: ``data.builtin_corpus`` is on, the tokenizer is the embedded one
    (missing too, or built beside its corpus text) and every path lies in its cache directory; a
    missing tokenizer does not leave ``kept`` prepared data of another tokenizer behind it."""
    key, path = next(iter(missing.items()))
    if not run.data.builtin_corpus:
        raise ConfigError(f"{run.source}: {key}: {path} is missing; build it with `python -m tokenizer.train` / "
                          "`python -m data_pipeline.prepare` or set data.builtin_corpus: true")
    if "data.tokenizer" in missing and kept:
        raise ConfigError(f"{run.source}: data.tokenizer: {tokenizer_dir} is missing, and {kept[0]} was prepared with "
                          "another tokenizer (its manifest.json names it): point data.tokenizer at that one")
    cache = tokenizer_dir.parent
    for key, path in missing.items():
        if key == "data.tokenizer":
            continue
        if "data.tokenizer" not in missing and not (cache / CORPUS).is_file():
            raise ConfigError(f"{run.source}: {key}: {path} is missing; data.builtin_corpus builds the embedded "
                              f"corpus only with its own tokenizer, and data.tokenizer {tokenizer_dir} is another one: "
                              "prepare it with `python -m data_pipeline.prepare`")
        if not _inside(path, cache):
            raise ConfigError(f"{run.source}: {key}: {path} is missing; data.builtin_corpus builds the embedded "
                              f"corpus only inside its cache directory {cache}/ (data.tokenizer's): point {key} there "
                              "or prepare it with `python -m data_pipeline.prepare`")
        name = key.removeprefix("data.validation.")
        if key.startswith("data.validation.") and name not in DOMAINS:
            raise ConfigError(f"{run.source}: {key}: {path} is missing and the embedded corpus has only the domains "
                              f"{', '.join(DOMAINS)}")
        expected = name if key.startswith("data.validation.") else PACKED
        if path.name != expected:  # a typo inside the cache trains on nothing it built
            raise ConfigError(f"{run.source}: {key}: {path} is missing; data.builtin_corpus builds it only in a "
                              f"directory named {expected!r} in its cache directory {cache}/: fix the path or "
                              "prepare it with `python -m data_pipeline.prepare`")


def setup_data(run: RunConfig, rank: int) -> tuple[TokenizerBundle, MixtureDataset]:
    tokenizer_dir = Path(run.data.tokenizer)
    no_tokenizer = not (tokenizer_dir / "tokenizer.json").is_file()
    missing = {"data.tokenizer": tokenizer_dir} if no_tokenizer else {}
    targets = {} if run.data.sources else {"data.dataset": run.data.dataset}
    if validating(run):
        targets.update({f"data.validation.{name}": path for name, path in run.data.validation.items()})
    kept = []  # prepared data a missing tokenizer would not match
    for key, path in targets.items():
        if not _prepared(path):
            missing[key] = Path(path)
        elif no_tokenizer and _built_by_embedded(path, tokenizer_dir.parent):
            missing[key] = Path(path)  # built with the embedded tokenizer that is gone: built again with the new one
        elif no_tokenizer:
            kept.append(f"{key} {path}")
    if missing:
        _check_buildable(run, missing, kept, tokenizer_dir)
    if missing and rank == 0:
        validation = {key.removeprefix("data.validation."): path for key, path in missing.items()
                      if key.startswith("data.validation.")}
        _build_builtin(run, tokenizer_dir, missing.get("data.dataset"), validation)
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


def check_fills_a_micro_batch(run: RunConfig, dataset: MixtureDataset, dp: int) -> None:
    """The training data holds at least one micro-batch per data-parallel rank; otherwise one line
    naming ``data.dataset`` or the mixture's sources with their sizes."""
    need = run.train.micro_batch_size * dp
    if len(dataset) >= need:
        return
    if not run.data.sources:
        what = f"data.dataset: {run.data.dataset}: its {len(dataset)} sequences"
    elif len(run.data.sources) == 1:
        what = f"data.sources[0] ({run.data.sources[0].name}): {run.data.sources[0].path}: its {len(dataset)} sequences"
    else:
        sizes = ", ".join(f"{s.name} {size}" for s, size in zip(run.data.sources, dataset.sizes))
        what = f"data.sources: the mixture's {len(dataset)} sequences ({sizes})"
    raise ConfigError(f"{run.source}: {what} cannot fill one micro-batch per rank (train.micro_batch_size "
                      f"{run.train.micro_batch_size} x {dp} data-parallel ranks = {need} sequences)")


def validation_sets(run: RunConfig, bundle: TokenizerBundle) -> dict[str, MixtureDataset]:
    """``data.validation``'s held-out sets (a directory, shard directories or a glob each), checked
    like the training data before any work."""
    return {name: MixtureDataset([_open_source(run, f"data.validation.{name}", name, path, 1.0, bundle)])
            for name, path in run.data.validation.items()}
