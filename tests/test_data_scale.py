"""Data at scale (issue 18) and prepare's hardening (issue 20): the input partition, sharded and
parallel prepare, weighted mixtures of prepared sources, ``data_pipeline.inspect``, empty inputs,
bounded tokenizer windows, stale temporaries, FIM-less tokenizers."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.catalog import open_prepared, prepared_dirs
from data_pipeline.dataset import DatasetError
from data_pipeline.encode import DocumentEncoder
from data_pipeline.inspect import main as inspect_main
from data_pipeline.mixture import MixtureDataset, MixtureSampler, Source
from data_pipeline.prepare import main as prepare_main
from plugins.errors import ConfigError
from text_sources.reading import iter_texts
from tokenizer.load import load_tokenizer_dir

from .conftest import ROOT
from .corpus import code_documents, paragraph_documents, prose_documents, write_jsonl

SEQ_LEN = 64


def _prepare(inputs, tokenizer_dir, output, *extra, seq_len=SEQ_LEN) -> int:
    return prepare_main(["--input", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "--seq-len", str(seq_len),
                         "--output", str(output), *extra])


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ the partition
@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """JSON Lines files of very different sizes (blank lines included), a .txt and a parquet file;
    returns (directory, every document as the files hold it)."""
    directory = tmp_path_factory.mktemp("mixed")
    paragraphs, code = paragraph_documents(), code_documents(limit=20)
    write_jsonl(directory / "a.jsonl", paragraphs[:1500])
    with (directory / "b.jsonl").open("w") as handle:
        for text in paragraphs[1500:1600]:
            handle.write(json.dumps({"text": text}) + "\n\n")
    write_jsonl(directory / "c.jsonl", code)
    (directory / "d.txt").write_text(prose_documents(limit=1)[0])
    pq.write_table(pa.table({"text": paragraphs[1600:1700]}), directory / "e.parquet")
    expected = paragraphs[:1700] + code + prose_documents(limit=1)
    return directory, [text for text in expected if text]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_partition_covers_every_row_exactly_once_across_shards(mixed_inputs, num_shards):
    directory, expected = mixed_inputs
    per_shard = [list(iter_texts([str(directory / "*")], num_shards=num_shards, shard_index=index))
                 for index in range(num_shards)]
    assert Counter(text for shard in per_shard for text in shard) == Counter(expected)
    if num_shards > 1:
        sizes = [sum(map(len, shard)) for shard in per_shard]
        assert max(sizes) < 2.5 * sum(sizes) / num_shards  # rows of the big file spread over the shards


def test_sharded_prepare_with_jobs_equals_the_array_job_tasks(mixed_inputs, tokenizer_dir, tmp_path):
    directory, expected = mixed_inputs
    inputs = [directory / "*"]
    assert _prepare(inputs, tokenizer_dir, tmp_path / "jobs", "--num-shards", "3", "--jobs", "2") == 0
    assert _prepare(inputs, tokenizer_dir, tmp_path / "task", "--num-shards", "3", "--shard-index", "1") == 0
    shards = prepared_dirs(str(tmp_path / "jobs"))
    assert [d.name for d in shards] == [f"shard-0000{i}-of-00003" for i in range(3)]
    task = tmp_path / "task" / "shard-00001-of-00003"
    for name in ("tokens-00000.npy", "pieces.npy"):
        assert (task / name).read_bytes() == (shards[1] / name).read_bytes()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in shards]
    assert sum(m["documents"] for m in manifests) == len(expected)
    # without FIM and splitting a document's tokens do not depend on the shard it fell in
    assert _prepare(inputs, tokenizer_dir, tmp_path / "plain", "--fim-rate", "0", "--split-rate", "0") == 0
    assert _prepare(inputs, tokenizer_dir, tmp_path / "plain3", "--fim-rate", "0", "--split-rate", "0",
                    "--jobs", "3") == 0
    whole = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    sharded = [json.loads((d / "manifest.json").read_text()) for d in prepared_dirs(str(tmp_path / "plain3"))]
    assert sum(m["tokens"] for m in sharded) == whole["tokens"]


def test_shard_flags_are_checked_before_any_work(mixed_inputs, tokenizer_dir, tmp_path, capsys):
    inputs = [mixed_inputs[0] / "a.jsonl"]
    for extra, flag in [(["--num-shards", "0"], "--num-shards 0"), (["--jobs", "0"], "--jobs 0"),
                        (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2"),
                        (["--num-shards", "4", "--shard-index", "1", "--jobs", "2"], "--jobs 2")]:
        assert flag in _one_line_error(capsys, _prepare(inputs, tokenizer_dir, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- prepare's hardening
def _empty_parquet(path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)


@pytest.mark.parametrize("name, write", [
    ("empty.jsonl", lambda p: p.write_bytes(b"")),
    ("blank.jsonl", lambda p: p.write_text("\n\n")),
    ("empty.json", lambda p: p.write_bytes(b"")),
    ("blank.json", lambda p: p.write_text(" \n")),
    ("empty.txt", lambda p: p.write_bytes(b"")),
    ("zero.parquet", lambda p: p.write_bytes(b"")),
    ("rowless.parquet", _empty_parquet),
])
def test_an_empty_input_of_every_format_is_one_line(name, write, tmp_path, tokenizer_dir, capfd):
    path = tmp_path / name
    write(path)
    code = _prepare([path], tokenizer_dir, tmp_path / "out")
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert f"{name}: no non-empty text found" in err
    assert not (tmp_path / "out").exists()


def test_a_long_document_is_tokenized_in_windows_to_the_tokens_of_the_whole(tokenizer_dir):
    bundle = load_tokenizer_dir(tokenizer_dir)
    text = "\n".join(code_documents(limit=40) + prose_documents(limit=40))
    assert len(text) > 500_000
    whole = bundle.tokenizer.encode(text, add_special_tokens=False).ids
    (doc,) = DocumentEncoder(bundle, fim_rate=0.0, split_rate=0.0, seed=0, window=300).encode([text], 0)
    assert doc.ids.tolist() == [bundle.bos_id, *whole, bundle.eos_id]
    unbroken = "x" * 1000  # no safe point: cut at the window, and still decoding to the text
    (doc,) = DocumentEncoder(bundle, fim_rate=0.0, split_rate=0.0, seed=0, window=300).encode([unbroken], 0)
    assert bundle.decode(doc.ids[1:-1].tolist()) == unbroken


PEAK_RSS = """
import resource, sys
from data_pipeline.prepare import main
if sys.argv[1] == "prepare":
    assert main(["--input", sys.argv[2], "--tokenizer", sys.argv[3], "--seq-len", "1024", "--output", sys.argv[4]]) == 0
else:
    open(sys.argv[2], encoding="utf-8").read()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_one_long_document_prepares_in_bounded_memory(tmp_path, tokenizer_dir):
    """An 8 MB document costs its text, 4 bytes a token and a fixed window beyond reading it (it
    cost ~160 bytes per byte: 1.3 GB)."""
    text = "\n".join(code_documents())
    document = tmp_path / "one.txt"
    document.write_text((text * (8_000_000 // len(text) + 1))[:8_000_000])
    peaks = {}
    for mode in ("read", "prepare"):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, mode, str(document), str(tokenizer_dir),
                                 str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[mode] = int(result.stdout.split()[-1]) / 1024
    print(peaks)
    assert peaks["prepare"] - peaks["read"] < 400, peaks


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path, tokenizer_dir, mixed_inputs):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{alive}", f".other.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokens-00000.npy").write_bytes(b"half")
    assert _prepare([mixed_inputs[0] / "c.jsonl"], tokenizer_dir, tmp_path / "out") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", f".out.tmp-{alive}", f".other.tmp-{dead}"])


def test_fim_rate_zero_accepts_a_tokenizer_without_fim_tokens(tmp_path, tokenizer_dir, mixed_inputs, capsys):
    plain = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["fim_tokens"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    corpus = [mixed_inputs[0] / "c.jsonl"]
    message = _one_line_error(capsys, _prepare(corpus, plain, tmp_path / "out"))
    assert "tokenizer_config.json: fim_tokens.begin missing" in message and "--fim-rate 0" in message
    assert _prepare(corpus, plain, tmp_path / "out", "--fim-rate", "0") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["fim_documents"] == 0


# ------------------------------------------------------------------------------------ mixtures
WEIGHTS = {"prose": 0.5, "code": 0.3, "docs": 0.2}


@pytest.fixture(scope="module")
def sources(tokenizer_dir, tmp_path_factory):
    """Three prepared sources of different sizes; the code source in 2 shards. {name: path}."""
    root = tmp_path_factory.mktemp("sources")
    texts = {"prose": paragraph_documents()[:600], "code": code_documents(limit=12), "docs": prose_documents(limit=4)}
    paths = {}
    for name, documents in texts.items():
        corpus = write_jsonl(root / f"{name}.jsonl", documents)
        extra = ["--jobs", "2"] if name == "code" else []
        assert _prepare([corpus], tokenizer_dir, root / name, *extra, seq_len=128) == 0
        paths[name] = root / name
    return paths


def _mixture(sources, tokenizer_dir, weights=WEIGHTS):
    fingerprint = load_tokenizer_dir(tokenizer_dir).fingerprint
    return MixtureDataset([Source(name, weight, open_prepared(prepared_dirs(str(sources[name])), fingerprint))
                           for name, weight in weights.items()])


def test_mixture_proportions_epochs_and_resume_at_any_data_parallel_size(sources, tokenizer_dir):
    dataset = _mixture(sources, tokenizer_dir)
    bounds = np.cumsum(dataset.sizes)
    assert len(dataset.sources[1].datasets) == 2 and dataset.sizes[2] * 5 < 6000 * 0.2  # sharded; many epochs
    stream = MixtureSampler(dataset, seed=5).global_indices(0, 6000)
    source = np.searchsorted(bounds, stream, side="right")
    weights = np.array(list(WEIGHTS.values()))
    counts = np.cumsum(np.eye(3, dtype=int)[source], axis=0)
    for window in (200, 300, 1000):  # any window, not only from the start
        assert np.abs(counts[window:] - counts[:-window] - window * weights).max() <= 2
    for s in range(3):  # no sequence again before its source is exhausted: each epoch is a permutation
        drawn = np.asarray(stream)[source == s] - (bounds[s] - dataset.sizes[s])
        size = dataset.sizes[s]
        for epoch in range(len(drawn) // size):
            assert sorted(drawn[epoch * size:(epoch + 1) * size]) == list(range(size))
    assert MixtureSampler(dataset, seed=6).global_indices(0, 100) != stream[:100]

    def run(world, batches, state=None):
        ranks = [MixtureSampler(dataset, rank=r, world_size=world, seed=5) for r in range(world)]
        for sampler in ranks:
            if state is not None:
                sampler.load_state_dict(json.loads(json.dumps(state)))
        steps = [[i for sampler in ranks for i in sampler.take(b)] for b in batches]
        return steps, ranks[0]

    batches = [8, 8, 16, 16, 32, 32, 64]
    uninterrupted, sampler = run(4, batches)
    assert [i for step in uninterrupted for i in step] == stream[:sum(batches)]
    taken = np.searchsorted(bounds, stream[:sum(batches)], side="right")
    stats = sampler.statistics()
    for s, name in enumerate(WEIGHTS):
        drawn = int((taken == s).sum())
        assert stats["source_tokens"][name] == drawn * 128
        assert stats["source_epochs"][name] == drawn // dataset.sizes[s]
    first, half = run(4, batches[:3])
    for world in (1, 2, 8):
        assert first + run(world, batches[3:], half.state_dict())[0] == uninterrupted
    with pytest.raises(DatasetError, match="resumes with the sources, weights"):
        MixtureSampler(_mixture(sources, tokenizer_dir, {**WEIGHTS, "docs": 0.4}), seed=5).load_state_dict(
            half.state_dict())


def test_a_corrupt_or_foreign_shard_is_one_line_before_any_work(sources, tokenizer_dir, tmp_path):
    from launch.config.run_config import load_run_config
    from launch.training.data import setup_data

    def setup(code_path):
        sets = [f"data.tokenizer={tokenizer_dir}", "data.builtin_corpus=false", "data.seq_len=128", "data.validation={}",
                "data.sources=" + json.dumps([{"name": n, "path": str(code_path if n == "code" else sources[n]),
                                               "weight": w} for n, w in WEIGHTS.items()])]
        return setup_data(load_run_config(ROOT / "configs" / "tiny.yaml", sets), rank=0)

    _, dataset = setup(sources["code"])
    assert [s.name for s in dataset.sources] == list(WEIGHTS) and len(dataset) == sum(dataset.sizes)
    broken = tmp_path / "code"
    shutil.copytree(sources["code"], broken)
    tokens = broken / "shard-00001-of-00002" / "tokens-00000.npy"
    tokens.write_bytes(tokens.read_bytes()[:1000])
    with pytest.raises(ConfigError) as error:
        setup(broken)
    assert "data.sources[1]" in str(error.value) and str(tokens) in str(error.value) and "\n" not in str(error.value)
    shutil.rmtree(broken / "shard-00001-of-00002")
    with pytest.raises(ConfigError, match="shard 1 of 2 is missing"):
        setup(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(sources["code"], foreign)
    manifest = foreign / "shard-00000-of-00002" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(load_tokenizer_dir(tokenizer_dir).fingerprint, "f" * 64))
    with pytest.raises(ConfigError) as error:
        setup(foreign)
    assert f"{foreign / 'shard-00000-of-00002'} and {foreign / 'shard-00001-of-00002'}: built with different " \
           "tokenizers (ffffffffffff…" in str(error.value)
    (foreign / "shard-00001-of-00002" / "manifest.json").write_text(manifest.read_text())
    with pytest.raises(ConfigError, match="shard-00000-of-00002/manifest.json: built with tokenizer ffffffffffff"):
        setup(foreign)


@pytest.mark.parametrize("value, message", [
    ("[{name: a, path: x, weight: 0}]", "data.sources[0].weight: must be positive"),
    ("[{name: a, path: x, weight: 1}, {name: a, path: y, weight: 1}]", "data.sources[1].name: 'a' names two"),
    ("[{name: a, path: x, wieght: 1}]", "data.sources[0].wieght: unknown key"),
    ("[{name: a, path: x}]", "data.sources[0].weight: required"),
    ("{name: a}", "data.sources: expected a list"),
])
def test_bad_data_sources_are_one_line_naming_the_key(value, message):
    from launch.config.run_config import load_run_config

    with pytest.raises(ConfigError) as error:
        load_run_config(ROOT / "configs" / "tiny.yaml", ["data.builtin_corpus=false", f"data.sources={value}"])
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="data.builtin_corpus: builds only data.dataset"):
        load_run_config(ROOT / "configs" / "tiny.yaml", ["data.sources=[{name: a, path: x, weight: 1}]"])


def test_inspect_summarises_and_refuses_mixing_window_lengths(sources, tokenizer_dir, tmp_path, capsys):
    assert inspect_main([str(sources["prose"]), str(sources["code"] / "shard-*")]) == 0
    lines = capsys.readouterr().out.splitlines()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in prepared_dirs(str(sources["code"]))]
    code_row = lines[2].split()
    assert code_row[1:5] == ["2", str(sum(m["documents"] for m in manifests)), str(sum(m["tokens"] for m in manifests)),
                             str(sum(m["sequences"] for m in manifests))]
    assert lines[3].startswith("total")
    corpus = write_jsonl(tmp_path / "c.jsonl", code_documents(limit=3))
    assert _prepare([corpus], tokenizer_dir, tmp_path / "short", seq_len=64) == 0
    message = _one_line_error(capsys, inspect_main([str(sources["prose"]), str(tmp_path / "short")]))
    assert f"{sources['prose']} and {tmp_path / 'short'}: different seq_len (128 vs 64)" in message


def test_inspect_reports_validation_documents_that_are_in_the_training_data(sources, tokenizer_dir, tmp_path, capsys):
    """By the text of each document (as hashed at prepare time, before FIM): two of the three held-out
    documents are in the docs source, prepared there with FIM and here without."""
    heldout = prose_documents(limit=4)[:2] + code_documents(limit=20)[-1:]
    assert _prepare([write_jsonl(tmp_path / "val.jsonl", heldout)], tokenizer_dir, tmp_path / "val", "--fim-rate", "0",
                    seq_len=128) == 0
    assert _prepare([write_jsonl(tmp_path / "new.jsonl", heldout[2:])], tokenizer_dir, tmp_path / "new",
                    seq_len=128) == 0
    training = [str(sources[name]) for name in ("prose", "code", "docs")]
    capsys.readouterr()
    assert inspect_main([*training, "--validation", str(tmp_path / "val"), str(tmp_path / "new")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == (f"warning: validation {tmp_path / 'val'}: 2 of its 3 documents are also in the training "
                         "data (the same text): their loss is not held out")
    assert lines[-1] == f"validation {tmp_path / 'new'}: none of its 1 documents is in the training data"
    old = tmp_path / "old"
    shutil.copytree(sources["docs"], old)
    (old / "document_hashes.npy").unlink()  # prepared before prepare kept the hashes
    message = _one_line_error(capsys, inspect_main([str(old), "--validation", str(tmp_path / "val")]))
    assert "old/document_hashes.npy: missing" in message and "prepare it again" in message


@pytest.mark.slow
def test_a_three_source_mixture_trains_in_its_proportions_and_resumes_exactly(sources, tokenizer_dir, tmp_path):
    """Through the launcher: 24 steps of a 0.5/0.3/0.2 mixture, each source's share of the consumed tokens within 1% of its weight; resumed from step 12, the
    same losses and per-source counts."""
    from .launcher import launch, metrics, ok

    mixture = json.dumps([{"name": n, "path": str(sources[n]), "weight": w} for n, w in WEIGHTS.items()])
    sets = [f"data.tokenizer={tokenizer_dir}", "data.builtin_corpus=false", "data.seq_len=128",
            f"data.sources={mixture}", "data.validation={}"]
    args = [item for s in sets for item in ("--set", s)]
    run = tmp_path / "run"
    ok(launch(1, run, "--steps", "24", "--save-interval", "12", *args))
    straight = metrics(run)
    last = straight[-1]
    assert sum(last["source_tokens"].values()) == last["tokens"]
    for name, weight in WEIGHTS.items():
        assert abs(last["source_tokens"][name] / last["tokens"] - weight) <= 0.01, last["source_tokens"]
    for name in WEIGHTS:
        size = sum(json.loads((d / "manifest.json").read_text())["sequences"] for d in prepared_dirs(str(sources[name])))
        assert last["source_epochs"][name] == last["source_tokens"][name] // 128 // size
    tags = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    ok(launch(1, run, "--steps", "24", "--resume-from", tags[0], *args))
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert (a["source_tokens"], a["source_epochs"]) == (b["source_tokens"], b["source_epochs"])


# ------------------------------------------------------------------ the probes' data findings (issue 29)
def _setup(tokenizer_dir, *sets):
    from launch.config.run_config import load_run_config
    from launch.training.data import setup_data

    run = load_run_config(ROOT / "configs" / "tiny.yaml", [f"data.tokenizer={tokenizer_dir}", "data.seq_len=128",
                                                           "data.validation={}", *sets])
    return run, setup_data(run, rank=0)[1]


def test_the_embedded_corpus_is_built_only_in_its_cache_with_its_tokenizer(tokenizer_dir, tmp_path):
    """``data.builtin_corpus`` (on in the tiny config) fills a missing ``data.dataset`` only inside the
    directory of its own tokenizer: a path elsewhere, or beside another tokenizer, is refused before
    anything is written."""
    elsewhere = tmp_path / "mine" / "packed"
    with pytest.raises(ConfigError, match=r"data.dataset: .*/packd is missing; data.builtin_corpus builds the "
                                          r"embedded corpus only with its own tokenizer"):
        _setup(tokenizer_dir, f"data.dataset={tokenizer_dir.parent / 'packd'}")  # a typo beside your tokenizer
    cache = tmp_path / "cache"
    shutil.copytree(tokenizer_dir, cache / "tokenizer")
    (cache / "python-corpus.jsonl").write_text("")  # the embedded tokenizer, built there before
    with pytest.raises(ConfigError, match=r"data.dataset: .*mine/packed is missing; .* only inside its cache "
                                          rf"directory {cache}/"):
        _setup(cache / "tokenizer", f"data.dataset={elsewhere}")
    with pytest.raises(ConfigError, match=r"only inside its cache directory"):  # nor with a tokenizer to build
        _setup(tmp_path / "fresh" / "tokenizer", f"data.dataset={elsewhere}")
    with pytest.raises(ConfigError, match=r"data.dataset: .*mine/packed is missing; build it with"):
        _setup(cache / "tokenizer", f"data.dataset={elsewhere}", "data.builtin_corpus=false")
    assert not (tmp_path / "mine").exists() and not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["python-corpus.jsonl", "tokenizer"]


def test_the_embedded_corpus_replaces_only_what_it_built(sources, tokenizer_dir, tmp_path):
    """A missing tokenizer makes the embedded corpus build a new one, and the data of the old one
    again: only data it built itself (the corpus text its one input). Prepared data of your own is
    never replaced: with a typo in ``data.tokenizer`` it is one line, and nothing is written."""
    from launch.training.data import _built_by_embedded

    mine = tmp_path / "data"
    shutil.copytree(sources["docs"], mine / "packed")
    before = sorted(p.name for p in mine.rglob("*"))
    with pytest.raises(ConfigError, match=rf"data.tokenizer: {mine / 'tokenzier'} is missing, and data.dataset "
                                          rf"{mine / 'packed'} was prepared with another tokenizer"):
        _setup(mine / "tokenzier", f"data.dataset={mine / 'packed'}")
    assert sorted(p.name for p in mine.rglob("*")) == before
    assert not _built_by_embedded(str(mine / "packed"), mine)
    manifest = json.loads((mine / "packed" / "manifest.json").read_text())
    for name, built in (("python-corpus.jsonl", True), ("python-heldout-code.jsonl", True), ("corpus.jsonl", False)):
        (mine / "packed" / "manifest.json").write_text(json.dumps({**manifest, "inputs": [str(mine / name)]}))
        assert _built_by_embedded(str(mine / "packed"), mine) == built, name
        assert not _built_by_embedded(str(mine / "packed"), tmp_path / "elsewhere"), name


def test_data_smaller_than_a_micro_batch_per_rank_names_its_source(sources, tokenizer_dir):
    from launch.training.data import check_fills_a_micro_batch

    one = json.dumps([{"name": "docs", "path": str(sources["docs"]), "weight": 1}])
    two = json.dumps([{"name": n, "path": str(sources[n]), "weight": 1} for n in ("docs", "code")])
    for sets, names in [([f"data.dataset={sources['docs']}"], f"data.dataset: {sources['docs']}: its "),
                        (["data.builtin_corpus=false", f"data.sources={one}"], f"data.sources[0] (docs): {sources['docs']}: its "),
                        (["data.builtin_corpus=false", f"data.sources={two}"], "data.sources: the mixture's ")]:
        run, dataset = _setup(tokenizer_dir, *sets)
        check_fills_a_micro_batch(run, dataset, dp=len(dataset) // 4)  # micro-batch 4: exactly full
        with pytest.raises(ConfigError) as error:
            check_fills_a_micro_batch(run, dataset, dp=len(dataset) // 4 + 1)
        assert names in str(error.value) and "cannot fill one micro-batch per rank" in str(error.value), error.value
    assert f"(docs {dataset.sizes[0]}, code {dataset.sizes[1]})" in str(error.value)


def test_shards_of_another_prepare_run_in_one_directory_are_refused(sources, tokenizer_dir, tmp_path):
    """A shard set is one prepare command's: a shard of another seed, or shards of another count
    beside a complete set, are one line; the same command's shard, however prepared, is accepted."""
    code, corpus = sources["code"], sources["code"].parent / "code.jsonl"
    assert _prepare([corpus], tokenizer_dir, tmp_path / "seed1", "--jobs", "2", "--seed", "1", seq_len=128) == 0
    assert _prepare([corpus], tokenizer_dir, tmp_path / "task", "--num-shards", "2", "--shard-index", "1",
                    seq_len=128) == 0

    def with_shard_1_from(run: str):
        mixed = tmp_path / f"mixed-{run}"
        shutil.copytree(code, mixed)
        shutil.rmtree(mixed / "shard-00001-of-00002")
        shutil.copytree(tmp_path / run / "shard-00001-of-00002", mixed / "shard-00001-of-00002")
        return str(mixed)

    assert len(prepared_dirs(with_shard_1_from("task"))) == 2  # the array job's task of the same command
    with pytest.raises(DatasetError, match=r"mixed-seed1: shard-00000-of-00002 and shard-00001-of-00002 come from "
                                           r"different prepare runs \(another input, seed or setting\)"):
        prepared_dirs(with_shard_1_from("seed1"))
    extra = tmp_path / "extra"
    shutil.copytree(code, extra)
    shutil.copytree(code / "shard-00000-of-00002", extra / "shard-00000-of-00003")
    with pytest.raises(DatasetError, match=r"extra: holds the shards of 2 prepare runs \(shard-\*-of-00002 and "
                                           r"shard-\*-of-00003\)"):
        prepared_dirs(str(extra))


def test_a_resume_refuses_a_source_whose_content_changed_and_accepts_rescaled_weights(sources, tokenizer_dir,
                                                                                       tmp_path):
    """The checkpoint's stream names each source's content (``content_sha256``): a source replaced by
    other data of the same size is refused, the same data prepared again is not; weights that
    normalise to the same shares are the same stream."""
    documents = prose_documents(limit=4)
    for name, texts in (("docs", documents), ("again", documents), ("reversed", documents[::-1])):
        corpus = write_jsonl(tmp_path / f"{name}.jsonl", texts)
        assert _prepare([corpus], tokenizer_dir, tmp_path / name, "--fim-rate", "0", "--split-rate", "0",
                        seq_len=128) == 0
    fingerprint = load_tokenizer_dir(tokenizer_dir).fingerprint

    def sampler(docs: str, weights=(0.5, 0.5)) -> MixtureSampler:
        parts = [("prose", sources["prose"]), ("docs", tmp_path / docs)]
        return MixtureSampler(MixtureDataset([Source(name, weight, open_prepared(prepared_dirs(str(path)), fingerprint))
                                              for (name, path), weight in zip(parts, weights)]), seed=5)

    saved = sampler("docs")
    saved.take(16)
    state = json.loads(json.dumps(saved.state_dict()))
    following = saved.take(16)
    for docs, weights in (("again", (0.5, 0.5)), ("docs", (1, 1)), ("again", (3, 3))):
        resumed = sampler(docs, weights)
        resumed.load_state_dict(state)
        assert resumed.take(16) == following, (docs, weights)
    replaced = sampler("reversed")
    assert replaced.sizes == saved.sizes  # other data of the same size
    with pytest.raises(DatasetError, match="data source docs: its data changed since the checkpoint was saved"):
        replaced.load_state_dict(state)
    with pytest.raises(DatasetError, match="resumes with the sources, weights"):
        sampler("docs", (1, 2)).load_state_dict(state)
