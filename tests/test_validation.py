"""Validation during training (issue 17): the specialisation measure against hand computations,
bits per byte's byte counts against the text's UTF-8 length, the embedded corpus's held-out
domains, and the trainer's per-domain numbers against ``launch.evaluate`` on the same checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launch.evaluate import main as evaluate
from launch.training.validation import specialization
from tokenizer.load import load_tokenizer_dir

from .corpus import code_documents, prose_documents
from .launcher import eval_records


def test_specialization_is_zero_when_domains_route_alike_and_ln2_when_disjoint():
    alike = torch.tensor([[[10, 30, 0, 60]], [[1, 3, 0, 6]]])  # [domains, blocks, experts]: same shares
    assert specialization(alike).tolist() == pytest.approx([0.0], abs=1e-12)
    disjoint = torch.tensor([[[5, 5, 0, 0]], [[0, 0, 5, 5]]])
    assert specialization(disjoint).tolist() == pytest.approx([math.log(2)])


def test_specialization_by_hand_with_unequal_domains():
    loads = torch.tensor([[[3.0, 1.0]], [[0.0, 4.0]]])  # domain a 3:1, domain b all on expert 1; pooled 3:5
    pooled = [3 / 8, 5 / 8]
    kl_a = 0.75 * math.log(0.75 / pooled[0]) + 0.25 * math.log(0.25 / pooled[1])
    kl_b = math.log(1 / pooled[1])
    assert specialization(loads).tolist() == pytest.approx([(kl_a + kl_b) / 2])


def test_token_bytes_sum_to_the_texts_utf8_length(tokenizer_dir):
    bundle = load_tokenizer_dir(tokenizer_dir)
    table = bundle.token_bytes()
    texts = code_documents(limit=5) + prose_documents(limit=5) + ["naïve café — ∑ 字節 🙂\n\tend"]
    for text in texts:
        assert sum(table[i] for i in bundle.encode(text)) == len(text.encode("utf-8"))
    assert table[bundle.bos_id] == table[bundle.eos_id] == 0


def test_embedded_corpus_holds_out_documents_of_both_domains(tmp_path):
    from data_pipeline.builtin_corpus import python_documents, write_heldout

    training = set(python_documents())
    for domain in ("code", "docs"):
        path = tmp_path / f"{domain}.jsonl"
        assert write_heldout(path, domain) > 0
        heldout = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        assert heldout and not training & set(heldout), domain


def test_embedded_corpus_holds_out_a_document_with_its_twins(monkeypatch, tmp_path):
    """Held out by content: identical files at any positions (the standard library has some, which
    ones depends on the Python version) are all held out or all trained on; about one in ten code
    documents is held out."""
    from data_pipeline import builtin_corpus

    texts = [f"def f{i}():\n    return {i}\n" for i in range(200)]
    library = texts + texts[::-1]  # every text twice: positions i and 399 - i (every tenth position would leak)
    monkeypatch.setattr(builtin_corpus, "domain_documents", lambda domain: library if domain == "code" else ["doc"])
    training, heldout = builtin_corpus._split("code")
    assert not set(training) & set(heldout) and sorted(set(training) | set(heldout)) == sorted(texts)
    assert len(training) == 400 - 2 * len(heldout) and 10 <= len(heldout) <= 30
    assert builtin_corpus.write_heldout(tmp_path / "code.jsonl", "code") > 0
    assert [json.loads(line)["text"] for line in (tmp_path / "code.jsonl").read_text().splitlines()] == heldout


def test_validation_records_and_wandb_keys(embedded_run):
    run_dir, data, result = embedded_run
    records = eval_records(run_dir)
    assert [r["step"] for r in records] == [20, 40]
    for record in records:
        assert set(record["val"]) == {"code", "docs"}
        for value in record["val"].values():
            assert value["tokens"] > 0 and 0 < value["bpb"] < value["loss"]  # > 1 byte per token
        assert len(record["maxvio_batch_per_block"]) == 2 and record["maxvio_batch"] > 0
        assert record["specialization"] > 0
        loads = record["domain_load"]
        assert len(loads["code"]) == 2 and len(loads["code"][0]) == 16  # the main model's MoE blocks
        assert sum(loads["docs"][0]) == sum(loads["docs"][1]) == 4 * 16 * 128  # top-4 of every token
    assert records[1]["val"]["code"]["loss"] < records[0]["val"]["code"]["loss"]
    assert "validation at step 40 | code loss" in result.stdout
    history = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    for key in [b"val/code/loss", b"val/docs/bpb", b"val/maxvio_batch", b"val/specialization"]:
        assert key in history, key


def test_validation_equals_launch_evaluate_on_the_same_checkpoint(embedded_run, tmp_path, capsys):
    run_dir, data, _ = embedded_run
    last = eval_records(run_dir)[-1]
    out = tmp_path / "eval.json"
    packed = [f"{name}={path}" for name, path in data["validation"].items()]
    assert evaluate(["--model", str(run_dir), "--packed", *packed, "--max-sequences", "16", "--batch-size", "4",
                     "--output", str(out)]) == 0
    result = json.loads(out.read_text())["packed"]
    for name in ("code", "docs"):
        assert result[name]["tokens"] == last["val"][name]["tokens"]
        assert result[name]["loss"] == pytest.approx(last["val"][name]["loss"], rel=1e-6)
        assert result[name]["bpb"] == pytest.approx(last["val"][name]["bpb"], rel=1e-6)
