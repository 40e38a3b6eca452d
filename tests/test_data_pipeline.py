import hashlib
import json

import numpy as np
import pytest
import torch

from data_pipeline import DatasetError, PackedDataset, PackedSampler
from data_pipeline.encode import DocumentEncoder
from data_pipeline.prepare import main as prepare_main
from tokenizer.load import load_tokenizer_dir

from .corpus import code_documents, paragraph_documents, write_jsonl

SEQ_LEN = 256


@pytest.fixture(scope="module")
def documents():
    return paragraph_documents() + code_documents(limit=40)


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents)


def _prepare(corpus, tokenizer_dir, output, *extra) -> dict:
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len", str(SEQ_LEN),
            "--output", str(output), *extra]
    assert prepare_main(argv) == 0
    return json.loads((output / "manifest.json").read_text())


@pytest.fixture(scope="module")
def packed(corpus, tokenizer_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("packed") / "best_fit"
    return output, _prepare(corpus, tokenizer_dir, output, "--seed", "7")


def _documents_from_output(output):
    """Reassemble every document's token stream from the packed rows and the piece index."""
    manifest = json.loads((output / "manifest.json").read_text())
    rows = np.concatenate([np.load(output / name) for name in manifest["shards"]])
    pieces = np.load(output / "pieces.npy")
    docs = {}
    for seq, start, length, doc, _offset in sorted(pieces.tolist(), key=lambda p: (p[3], p[4])):
        docs.setdefault(doc, []).append(rows[seq, start : start + length])
    return rows, pieces, {d: np.concatenate(parts) for d, parts in docs.items()}


def test_every_token_appears_exactly_once_and_short_documents_stay_whole(packed, documents, tokenizer_dir):
    output, manifest = packed
    rows, pieces, rebuilt = _documents_from_output(output)
    encoder = DocumentEncoder(load_tokenizer_dir(tokenizer_dir), manifest["fim_rate"], manifest["split_rate"], seed=7)
    expected = encoder.encode(documents, first_index=0)
    assert len(rebuilt) == len(expected) == manifest["documents"]
    for index, doc in enumerate(expected):
        np.testing.assert_array_equal(rebuilt[index], doc.ids)
    # Nothing else is in the rows but padding.
    used = np.zeros(rows.shape, dtype=bool)
    for seq, start, length, _, _ in pieces.tolist():
        assert not used[seq, start : start + length].any()
        used[seq, start : start + length] = True
    assert (rows[~used] == manifest["pad_id"]).all()
    pieces_per_doc = np.bincount(pieces[:, 3])
    lengths = np.array([doc.ids.size for doc in expected])
    assert (pieces_per_doc[lengths <= SEQ_LEN] == 1).all()
    assert manifest["truncated_documents"] == int((lengths > SEQ_LEN).sum()) > 0


def test_manifest_counts(packed):
    _, manifest = packed
    for key in ["documents", "tokens", "sequences", "padding_tokens", "truncated_documents", "fim_documents",
                "split_tokens", "seq_len", "seed"]:
        assert key in manifest
    assert manifest["padding_tokens"] == manifest["sequences"] * SEQ_LEN - manifest["tokens"]
    assert manifest["dtype"] == "uint16" and len(manifest["tokenizer"]["fingerprint"]) == 64


def test_fim_rate_and_well_formed_fim_documents(packed, documents, tokenizer_dir):
    output, manifest = packed
    assert len(documents) > 2000
    assert abs(manifest["fim_documents"] / manifest["documents"] - 0.1) <= 0.02
    bundle = load_tokenizer_dir(tokenizer_dir)
    _, _, rebuilt = _documents_from_output(output)
    decode = lambda ids: bundle.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    fim_seen = 0
    for index, ids in rebuilt.items():
        assert ids[0] == bundle.bos_id and ids[-1] == bundle.eos_id
        if ids[1] != bundle.fim_begin_id:
            assert decode(ids[1:-1]) == documents[index]
            continue
        fim_seen += 1
        hole, end = [int(np.flatnonzero(ids == t)[0]) for t in (bundle.fim_hole_id, bundle.fim_end_id)]
        assert 2 <= hole < end < len(ids) - 1
        prefix, suffix, middle = ids[2:hole], ids[hole + 1 : end], ids[end + 1 : -1]
        assert decode(prefix) + decode(middle) + decode(suffix) == documents[index]
    assert fim_seen == manifest["fim_documents"]


def test_split_tokens_decode_to_the_same_text(corpus, documents, tokenizer_dir, tmp_path):
    manifest = _prepare(corpus, tokenizer_dir, tmp_path / "all_split", "--split-rate", "1", "--fim-rate", "0")
    bundle = load_tokenizer_dir(tokenizer_dir)
    _, _, rebuilt = _documents_from_output(tmp_path / "all_split")
    splittable = set(bundle.split_table)
    unsplit = sum(sum(t in splittable for t in e.ids) for e in bundle.tokenizer.encode_batch(documents, add_special_tokens=False))
    assert manifest["split_tokens"] == unsplit > 100
    for index, ids in rebuilt.items():
        assert not splittable & set(ids.tolist())
        assert bundle.tokenizer.decode(ids[1:-1].tolist(), skip_special_tokens=False) == documents[index]


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.npy"))}


def test_deterministic_for_a_seed(corpus, tokenizer_dir, packed, tmp_path):
    _prepare(corpus, tokenizer_dir, tmp_path / "again", "--seed", "7", "--workers", "1")
    assert _digest(tmp_path / "again") == _digest(packed[0])
    _prepare(corpus, tokenizer_dir, tmp_path / "other", "--seed", "8")
    assert _digest(tmp_path / "other") != _digest(packed[0])


def test_best_fit_keeps_documents_whole_at_the_density_of_concat(corpus, tokenizer_dir, packed, tmp_path):
    concat = _prepare(corpus, tokenizer_dir, tmp_path / "concat", "--seed", "7", "--packing", "concat")
    best = packed[1]
    assert best["tokens"] == concat["tokens"]
    assert best["sequences"] <= concat["sequences"] * 1.01
    assert best["truncated_documents"] < concat["truncated_documents"]


def test_reader_gives_next_token_labels_and_document_ids(packed, tokenizer_dir):
    output, manifest = packed
    dataset = PackedDataset(output, tokenizer_fingerprint=load_tokenizer_dir(tokenizer_dir).fingerprint)
    assert len(dataset) == manifest["sequences"]
    pieces = np.load(output / "pieces.npy")
    for index in [0, len(dataset) // 2, len(dataset) - 1]:
        sample = dataset[index]
        ids, labels, docs = sample["input_ids"], sample["labels"], sample["document_ids"]
        assert ids.shape == labels.shape == docs.shape == (SEQ_LEN,) and ids.dtype == torch.long
        mine = pieces[pieces[:, 0] == index]
        used = int(mine[:, 2].sum())
        assert torch.equal(labels[: used - 1], ids[1:used])
        assert (labels[used - 1 :] == -100).all() and (docs[used:] == -1).all()
        assert docs[:used].tolist() == np.repeat(np.arange(len(mine)), mine[:, 2]).tolist()


def test_reader_refuses_another_tokenizer(packed):
    with pytest.raises(DatasetError, match="built with tokenizer"):
        PackedDataset(packed[0], tokenizer_fingerprint="0" * 64)


def test_sampler_global_batches_split_over_ranks_and_resume_at_any_data_parallel_size():
    def steps(world: int, batches: list[int], sampler_state=None) -> list[list[int]]:
        ranks = [PackedSampler(103, rank=r, world_size=world, seed=3) for r in range(world)]
        for sampler in ranks:
            if sampler_state is not None:
                sampler.load_state_dict(json.loads(json.dumps(sampler_state)))  # survives a checkpoint
        out = [[i for sampler in ranks for i in sampler.take(b)] for b in batches]
        return out, ranks[0].state_dict()

    batches = [8, 8, 16, 16, 32, 32, 16]  # a ramp, crossing two epoch boundaries (128 > 103)
    uninterrupted, _ = steps(4, batches)
    epoch0 = [i for step in uninterrupted for i in step][:103]
    assert sorted(epoch0) == list(range(103))  # every sample once per epoch, none left out
    assert uninterrupted[4][:8] != sorted(uninterrupted[4][:8])  # shuffled
    first, state = steps(4, batches[:3])
    for world in (1, 2, 4, 8):
        resumed, _ = steps(world, batches[3:], state)
        assert first + resumed == uninterrupted
    with pytest.raises(DatasetError, match="the checkpoint's data stream was 103 sequences with seed 3, this run's is 100"):
        PackedSampler(100, seed=3).load_state_dict(state)
    same_size = PackedSampler(103, seed=3, fingerprint="b" * 64)
    with pytest.raises(DatasetError, match="the dataset: its data changed since the checkpoint was saved"):
        same_size.load_state_dict({**state, "fingerprint": "a" * 64})


def _error(capsys, argv) -> str:
    assert prepare_main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message


def _args(inputs, tokenizer_dir, output, *extra):
    return ["--input", *map(str, inputs), "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
            "--output", str(output), *extra]


def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n{"text": "four"}\n')
    assert "bad.jsonl: line 3: invalid JSON" in _error(capsys, _args([bad], tokenizer_dir, tmp_path / "o"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    assert "latin.txt: line 2: not valid UTF-8" in _error(capsys, _args([latin], tokenizer_dir, tmp_path / "o"))
    nofield = write_jsonl(tmp_path / "nofield.jsonl", ["x"], field="body")
    assert "nofield.jsonl: line 1: field 'text' not found (fields: body)" in _error(capsys, _args([nofield], tokenizer_dir, tmp_path / "o"))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    assert "mixed.jsonl: line 2: field 'text' not found (fields: title)" in _error(
        capsys, _args([mixed], tokenizer_dir, tmp_path / "o"))
    assert "tokenizer.json: missing" in _error(capsys, _args([mixed], tmp_path, tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_skip_bad_counts_what_it_skipped(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two"}\n{"text": oops}\n{"text": ""}\n{"text": "four five"}\n'
                   + '{"text": "caf\xe9"}\n')
    with bad.open("ab") as handle:
        handle.write(b'{"text": "caf\xe9 latin"}\n')
    assert prepare_main(_args([bad], tokenizer_dir, tmp_path / "out", "--skip-bad")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["skipped_bad_rows"] == 2 and manifest["empty_documents"] == 1
    assert manifest["skipped_examples"] == [f"{bad}:2", f"{bad}:6"]


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, tokenizer_dir, corpus, monkeypatch):
    import data_pipeline.encode as encode

    calls = {"n": 0}
    original = encode.DocumentEncoder.encode

    def failing(self, texts, first_index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, texts, first_index)

    monkeypatch.setattr(encode.DocumentEncoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_main(_args([corpus], tokenizer_dir, tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
