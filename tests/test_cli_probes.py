"""Hostile-input probes: every CLI x {missing, empty, malformed, wrong type, wrong encoding, out of
range} -> exit code 2, exactly one ``error: ...`` line on stderr naming the file or flag, no
traceback, nothing written. The CLIs' ``main(argv)`` run in-process (captured at the file
descriptors, so output of native libraries counts too). Damaged checkpoints are probed elsewhere."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, hf_reference_config, save_hf

BAD_FILES = {  # kind -> (file name, bytes); "missing" is never written
    "missing": ("missing.jsonl", None),
    "empty": ("empty.jsonl", b""),
    "malformed": ("malformed.jsonl", b'{"text": "fine"}\n{"text": "broken"\n'),
    "wrong type": ("wrong_type.jsonl", b'{"text": "fine"}\n{"text": 5}\n'),
    "wrong encoding": ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
}
BAD_TEXT_FORMATS = {  # the other supported extensions, empty
    "empty .json": ("empty.json", b""), "empty .txt": ("empty.txt", b""), "empty .parquet": ("empty.parquet", b""),
}
BAD_YAML = {
    "missing": ("missing.yaml", None),
    "empty": ("empty.yaml", b""),
    "malformed": ("malformed.yaml", b"model: [unclosed\n"),
    "wrong type": ("wrong_type.yaml", b"model:\n  hidden_size: large\n"),
    "wrong encoding": ("latin1.yaml", b"model:\n  hidden_size: 64  # caf\xe9\n"),
}
TOKENIZER_CONFIG = json.dumps({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"})
BAD_TOKENIZERS = {  # kind -> (directory name, {file: bytes}); "missing" is never created
    "missing": ("missing_tok", None),
    "empty": ("empty_tok", {}),
    "malformed": ("malformed_tok", {"tokenizer.json": b'{"model": ', "tokenizer_config.json": TOKENIZER_CONFIG.encode()}),
    "wrong type": ("wrong_type_tok", {"tokenizer_config.json": b'["bos_token"]'}),
    "wrong encoding": ("latin1_tok", {"tokenizer_config.json": b'{"bos_token": "caf\xe9"}'}),
}
BAD_METRICS = {
    "missing": ("missing_run", None),
    "empty": ("empty_run", b""),
    "malformed": ("malformed_run", b'{"step": 1, "loss": 2.0\n'),
    "wrong type": ("wrong_type_run", b'{"step": 1, "loss": "high"}\n'),
    "wrong encoding": ("latin1_run", b'{"step": 1, "loss": 2.0, "note": "caf\xe9"}\n'),
}


def _write_bad(directory: Path, table: dict, kind: str) -> Path:
    name, content = table[kind]
    path = directory / name
    if content is not None and name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    elif content is not None:
        path.write_bytes(content)
    return path


def _bad_tokenizer(directory: Path, kind: str, good: Path) -> Path:
    name, files = BAD_TOKENIZERS[kind]
    path = directory / name
    if files is not None:
        path.mkdir()
        if kind == "wrong type" or kind == "wrong encoding":
            (path / "tokenizer.json").write_bytes((good / "tokenizer.json").read_bytes())
        for file, content in files.items():
            (path / file).write_bytes(content)
    return path


def _bad_run(directory: Path, kind: str) -> Path:
    name, content = BAD_METRICS[kind]
    path = directory / name
    if content is not None:
        path.mkdir()
        (path / "metrics.jsonl").write_bytes(content)
    return path


def probe(capfd, run, names: str, output: Path | None = None) -> str:
    """Run one CLI call; it must exit 2 with one line naming ``names`` and leave ``output`` absent."""
    code = run()
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr:\n{err}"
    assert names in lines[0], lines[0]
    if output is not None:
        assert not output.exists(), f"{output} was written"
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny DeepseekV3 HF directory over the test tokenizer's 1024-token vocabulary."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_reference_config(vocab_size=1024, max_position_embeddings=256)).eval()
    return save_hf(model, tmp_path_factory.mktemp("probes") / "hf")


FILE_KINDS = list(BAD_FILES)


# --------------------------------------------------------------------------- tokenizer.train
@pytest.mark.parametrize("kind", FILE_KINDS + list(BAD_TEXT_FORMATS))
def test_tokenizer_train_bad_input(kind, tmp_path, capfd):
    from tokenizer.train import main

    path = _write_bad(tmp_path, {**BAD_FILES, **BAD_TEXT_FORMATS}, kind)
    out = tmp_path / "tok"
    probe(capfd, lambda: main(["--input", str(path), "--vocab-size", "300", "--output", str(out)]), path.name, out)


@pytest.mark.parametrize("flag,value", [("--vocab-size", "10"), ("--max-bytes", "0"), ("--heldout-bytes", "-1"),
                                        ("--min-frequency", "0")])
def test_tokenizer_train_out_of_range_flag(flag, value, tmp_path, capfd):
    from tokenizer.train import main

    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "hello world"}\n')
    argv = {"--input": str(path), "--vocab-size": "300", "--output": str(tmp_path / "tok"), flag: value}
    probe(capfd, lambda: main([a for item in argv.items() for a in item]), f"{flag} {value}", tmp_path / "tok")


@pytest.mark.parametrize("flags,names", [
    (["--bos-token", ""], "--bos-token '': must be a non-empty string"),
    (["--eos-token", "<｜begin▁of▁sentence｜>"], "--bos-token and --eos-token are both '<｜begin▁of▁sentence｜>'"),
    (["--pad-token", "<x>", "--fim-end-token", "<x>"], "--pad-token and --fim-end-token are both '<x>'"),
])
def test_tokenizer_train_empty_or_equal_special_tokens(flags, names, tmp_path, capfd):
    from tokenizer.train import main

    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "hello world"}\n')
    out = tmp_path / "tok"
    probe(capfd, lambda: main(["--input", str(path), "--vocab-size", "300", "--output", str(out), *flags]), names, out)


# --------------------------------------------------------------------------- data_pipeline.prepare
@pytest.mark.parametrize("kind", FILE_KINDS + list(BAD_TEXT_FORMATS))
def test_prepare_bad_input(kind, tmp_path, capfd, tokenizer_dir):
    from data_pipeline.prepare import main

    path = _write_bad(tmp_path, {**BAD_FILES, **BAD_TEXT_FORMATS}, kind)
    out = tmp_path / "packed"
    probe(capfd, lambda: main(["--input", str(path), "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
                               "--output", str(out)]), path.name, out)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_prepare_bad_tokenizer(kind, tmp_path, capfd, tokenizer_dir):
    from data_pipeline.prepare import main

    corpus = tmp_path / "ok.jsonl"
    corpus.write_text('{"text": "hello world"}\n')
    tok = _bad_tokenizer(tmp_path, kind, tokenizer_dir)
    out = tmp_path / "packed"
    probe(capfd, lambda: main(["--input", str(corpus), "--tokenizer", str(tok), "--seq-len", "64",
                               "--output", str(out)]), tok.name, out)


@pytest.mark.parametrize("flag,value", [("--seq-len", "1"), ("--fim-rate", "1.5"), ("--split-rate", "-0.1"),
                                        ("--workers", "0")])
def test_prepare_out_of_range_flag(flag, value, tmp_path, capfd, tokenizer_dir):
    from data_pipeline.prepare import main

    corpus = tmp_path / "ok.jsonl"
    corpus.write_text('{"text": "hello world"}\n')
    argv = {"--input": str(corpus), "--tokenizer": str(tokenizer_dir), "--seq-len": "64",
            "--output": str(tmp_path / "packed"), flag: value}
    probe(capfd, lambda: main([a for item in argv.items() for a in item]), f"{flag} {value}", tmp_path / "packed")


def _dying_prepare(args, progress=None) -> dict:
    """``prepare`` of a job process that is killed while on shard 1 (the others take a moment)."""
    import os
    import signal
    import time

    if args.shard_index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    return {}


def test_prepare_jobs_a_killed_job_names_the_shards_to_rerun(tmp_path, capfd, tokenizer_dir, monkeypatch):
    """Each job is ``data_pipeline.prepare.prepare`` run in a spawned process, pickled by name: here
    one that kills its own process on shard 1."""
    import data_pipeline.prepare as prepare

    monkeypatch.setattr(prepare, "prepare", _dying_prepare)
    corpus = tmp_path / "ok.jsonl"
    corpus.write_text('{"text": "hello world"}\n')
    line = probe(capfd, lambda: prepare.main(["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len",
                                              "64", "--output", str(tmp_path / "packed"), "--num-shards", "3",
                                              "--jobs", "2"]), "--jobs 2: a job process died")
    unfinished = line.split("for I in ")[1].split(", ")
    assert {"1", "2"} <= set(unfinished) <= {"0", "1", "2"}, line  # shard 0 may have finished first
    assert "--shard-index I in place of --jobs" in line and "of 3 did not finish" in line


# --------------------------------------------------------------------------- launch.pretrain
@pytest.mark.parametrize("kind", list(BAD_YAML))
def test_pretrain_bad_config(kind, tmp_path, capfd):
    from launch.pretrain import main

    path = _write_bad(tmp_path, BAD_YAML, kind)
    run_dir = tmp_path / "run"
    probe(capfd, lambda: main(["--config", str(path), "--run-dir", str(run_dir)]), path.name, run_dir)


@pytest.mark.parametrize("flag,value,names", [
    ("--steps", "0", "--steps 0"), ("--save-interval", "0", "save_interval"), ("--pp", "0", "pp"),
    ("--ep", "0", "ep"), ("--ep", "3", "ep"),
])
def test_pretrain_out_of_range_flag(flag, value, names, tmp_path, capfd):
    from launch.pretrain import main

    run_dir = tmp_path / "run"
    probe(capfd, lambda: main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir),
                               flag, value]), names, run_dir)


@pytest.mark.parametrize("inside", [False, True])
def test_pretrain_run_dir_that_is_a_file(inside, tmp_path, capfd):
    from launch.pretrain import main

    path = tmp_path / "run"
    path.write_text("not a directory")
    run_dir = path / "sub" if inside else path
    line = probe(capfd, lambda: main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir)]),
                 f"--run-dir {run_dir}")
    assert "is not a directory" in line and path.read_text() == "not a directory"


# --------------------------------------------------------------------------- launch.evaluate
@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("option", ["--data", "--choices"])
def test_evaluate_bad_input(option, kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.evaluate import main

    path = _write_bad(tmp_path, BAD_FILES, kind)
    out = tmp_path / "eval.json"
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), option, str(path),
                               "--output", str(out)]), path.name, out)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_evaluate_bad_tokenizer(kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.evaluate import main

    data = tmp_path / "ok.jsonl"
    data.write_text('{"text": "hello world"}\n')
    tok = _bad_tokenizer(tmp_path, kind, tokenizer_dir)
    out = tmp_path / "eval.json"
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tok), "--data", str(data),
                               "--output", str(out)]), tok.name, out)


@pytest.mark.parametrize("flag,value", [("--seq-len", "1"), ("--seq-len", "100000"), ("--stride", "0"),
                                        ("--batch-size", "0"), ("--limit", "0"), ("--num-fewshot", "-1")])
def test_evaluate_out_of_range_flag(flag, value, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.evaluate import main

    data = tmp_path / "ok.jsonl"
    data.write_text('{"text": "hello world"}\n')
    out = tmp_path / "eval.json"
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--data", str(data),
                               "--output", str(out), flag, value]), flag, out)


# --------------------------------------------------------------------------- launch.generate
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_generate_bad_tokenizer(kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.generate import main

    tok = _bad_tokenizer(tmp_path, kind, tokenizer_dir)
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tok), "--prompt", "def"]), tok.name)


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "0"), ("--top-p", "0"), ("--temperature", "-1"),
                                        ("--max-new-tokens", "100000")])
def test_generate_out_of_range_flag(flag, value, capfd, hf_dir, tokenizer_dir):
    from launch.generate import main

    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--prompt", "def",
                               flag, value]), f"{flag} {value}")


def test_generate_missing_model(tmp_path, capfd, tokenizer_dir):
    from launch.generate import main

    probe(capfd, lambda: main(["--model", str(tmp_path / "nowhere"), "--prompt", "def"]), "nowhere")


# --------------------------------------------------------------------------- launch.niah
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_niah_bad_haystack(kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.niah import main

    path = _write_bad(tmp_path, BAD_FILES, kind)
    out = tmp_path / "niah"
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--lengths", "64",
                               "--haystack", str(path), "--output", str(out)]), path.name, out)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_niah_bad_tokenizer(kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.niah import main

    tok = _bad_tokenizer(tmp_path, kind, tokenizer_dir)
    out = tmp_path / "niah"
    probe(capfd, lambda: main(["--model", str(hf_dir), "--tokenizer", str(tok), "--lengths", "64",
                               "--output", str(out)]), tok.name, out)


@pytest.mark.parametrize("flag,value", [("--lengths", "0"), ("--lengths", "100000"), ("--depths", "1.5"),
                                        ("--trials", "0")])
def test_niah_out_of_range_flag(flag, value, tmp_path, capfd, hf_dir, tokenizer_dir):
    from launch.niah import main

    argv = {"--model": str(hf_dir), "--tokenizer": str(tokenizer_dir), "--lengths": "64",
            "--output": str(tmp_path / "niah"), flag: value}
    probe(capfd, lambda: main([a for item in argv.items() for a in item]), f"{flag} {value}", tmp_path / "niah")


# --------------------------------------------------------------------------- launch.dashboard
@pytest.mark.parametrize("kind", list(BAD_METRICS))
def test_dashboard_bad_metrics(kind, tmp_path, capfd):
    from launch.dashboard import main

    run_dir = _bad_run(tmp_path, kind)
    probe(capfd, lambda: main([str(run_dir)]), run_dir.name, run_dir / "plots")


# --------------------------------------------------------------------------- launch.lm_eval_model
LM_EVAL_LOG = re.compile(r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (INFO|WARNING) ")


def test_lm_eval_cli_missing_tokenizer(tmp_path, capfd, monkeypatch, hf_dir):
    """Through lm-eval's own command line (~15 s: it indexes its task registry first): lm-eval's
    INFO log lines, then one error line; nothing written."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from launch.lm_eval_model import main

    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["deepseek-lm-eval", "--model", "deepseek-pretrain", "--model_args",
                                      f"path={hf_dir},tokenizer={tmp_path / 'missing_tok'}", "--tasks", "local_choice",
                                      "--include_path", "configs/eval", "--output_path", str(out)])
    monkeypatch.chdir(ROOT)
    assert main() == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert all(LM_EVAL_LOG.match(line) for line in lines[:-1]), lines
    assert lines[-1].startswith("error: ") and "missing_tok" in lines[-1], lines[-1]
    assert not out.exists()


def test_lm_eval_cli_unknown_task(tmp_path, capfd, monkeypatch, hf_dir, tokenizer_dir):
    """A task lm-eval does not know: its INFO lines, then one error line naming the task (~5 s: lm-eval
    indexes its whole task registry to look for it)."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from launch.lm_eval_model import main

    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["deepseek-lm-eval", "--model", "deepseek-pretrain", "--model_args",
                                      f"path={hf_dir},tokenizer={tokenizer_dir}", "--tasks", "local_choice,no_such_task",
                                      "--include_path", "configs/eval", "--output_path", str(out)])
    monkeypatch.chdir(ROOT)
    assert main() == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert all(LM_EVAL_LOG.match(line) for line in lines[:-1]), lines
    assert lines[-1].startswith("error: --tasks: unknown no_such_task (see `lm-eval ls tasks`"), lines[-1]
    assert not out.exists()


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_lm_eval_bad_tokenizer(kind, tmp_path, capfd, hf_dir, tokenizer_dir):
    """The model lm-eval's command line builds (``create_from_arg_string``), as its ``main`` runs it."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from launch.evaluation.lm_eval import DeepSeekPretrainLM
    from plugins.errors import run_cli

    tok = _bad_tokenizer(tmp_path, kind, tokenizer_dir)
    probe(capfd, lambda: run_cli(lambda: DeepSeekPretrainLM.create_from_arg_string(
        f"path={hf_dir},tokenizer={tok}", {"batch_size": 1, "max_batch_size": None, "device": None})), tok.name)


@pytest.mark.parametrize("model_args,config,names", [
    ("max_length=0", {}, "max_length=0"), ("max_length=100000", {}, "max_length=100000"),
    ("", {"batch_size": 0}, "batch_size=0"), ("speculative=beam", {}, "speculative=beam"),
])
def test_lm_eval_out_of_range_model_args(model_args, config, names, capfd, hf_dir, tokenizer_dir):
    pytest.importorskip("lm_eval", reason="the eval extra")
    from launch.evaluation.lm_eval import DeepSeekPretrainLM
    from plugins.errors import run_cli

    arg_string = ",".join(filter(None, [f"path={hf_dir},tokenizer={tokenizer_dir}", model_args]))
    probe(capfd, lambda: run_cli(lambda: DeepSeekPretrainLM.create_from_arg_string(
        arg_string, {"batch_size": 1, "max_batch_size": None, "device": None, **config})), names)


# --------------------------------------------------------------------------- plugins.model count
@pytest.mark.parametrize("kind", list(BAD_YAML))
def test_model_count_bad_config(kind, tmp_path, capfd):
    from plugins.model.__main__ import main

    path = _write_bad(tmp_path, BAD_YAML, kind)
    probe(capfd, lambda: main(["count", str(path)]), path.name)


def test_model_count_out_of_range_value(capfd):
    from plugins.model.__main__ import main

    probe(capfd, lambda: main(["count", str(ROOT / "configs" / "tiny.yaml"), "--set", "model.hidden_size=0"]),
          "model.hidden_size")


# --------------------------------------------------------------------------- plugins.parallel simulate
@pytest.mark.parametrize("flag,value", [("--pp", "0"), ("--pp", "3"), ("--micro-batches", "0"), ("--w", "3"),
                                        ("--f", "-1"), ("--fb", "0")])
def test_simulate_out_of_range_flag(flag, value, tmp_path, capfd):
    from plugins.parallel.pipeline_sim import main

    argv = {"--pp": "4", "--micro-batches": "8", "--out": str(tmp_path / "sim"), flag: value}
    probe(capfd, lambda: main(["simulate", *[a for item in argv.items() for a in item]]), flag, tmp_path / "sim")


def test_simulate_output_is_a_file(tmp_path, capfd):
    from plugins.parallel.pipeline_sim import main

    out = tmp_path / "sim"
    out.write_text("not a directory")
    probe(capfd, lambda: main(["simulate", "--pp", "4", "--micro-batches", "8", "--out", str(out)]), "--out")
