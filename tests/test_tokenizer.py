import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from tokenizer.special_tokens import SpecialTokens
from tokenizer.train import main

from .conftest import ROOT
from .corpus import code_documents, prose_documents, write_jsonl

ADVERSARIAL = [
    "",
    " ",
    "\n\n\n",
    "中文字符与日本語のテキスト、한국어 텍스트",
    "emoji 😀👩‍👩‍👧‍👦 flags 🇫🇷 and skin tones 👍🏽",
    "control \x00\x01\x07\x1b[31m\x7f bytes\t\r\n",
    "mixed: Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "combining e\u0301 and zero\u200bwidth\u200djoiner \ufeffbom",
    "numbers 1234567890 3.14159e-10 0xDEADBEEF",
    "code:\n\tdef f(x):\n\t\treturn {'a': [1, 2]}  # done.\n\n\n",
    "    leading and trailing spaces    ",
    "windows\r\nline\r\nends\r\n",
    "specials inline <｜fim▁hole｜> and <｜end▁of▁sentence｜> stay",
    "partial special <｜fim▁ho and <｜begin",
    "a" * 5000,
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    documents = code_documents(limit=80) + prose_documents(limit=300)
    return write_jsonl(directory / "train.jsonl", documents)


@pytest.fixture(scope="session")
def held_out():
    return code_documents()[80:140] + prose_documents()[300:400]


def _train(corpus, output, *extra) -> int:
    return main(["--input", str(corpus), "--vocab-size", "1024", "--output", str(output), *extra])


@pytest.fixture(scope="session")
def trained_dirs(corpus, tmp_path_factory):
    """Both backends trained once on the same corpus."""
    outputs = {}
    for backend in ("tokenizers", "sentencepiece"):
        outputs[backend] = tmp_path_factory.mktemp(backend) / "tok"
        assert _train(corpus, outputs[backend], "--backend", backend) == 0
    return outputs


@pytest.fixture(params=["tokenizers", "sentencepiece"])
def trained(request, trained_dirs):
    return request.param, trained_dirs[request.param]


def _tokenizer(output) -> Tokenizer:
    return Tokenizer.from_file(str(output / "tokenizer.json"))


def test_round_trip_is_lossless(trained, held_out):
    backend, output = trained
    tokenizer = _tokenizer(output)
    for text in held_out + ADVERSARIAL:
        if backend == "sentencepiece":
            text = text.replace("\u2581", " ")  # sentencepiece's space symbol (documented caveat)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size() == 1024


def test_byte_level_round_trips_sentencepiece_space_symbol(trained_dirs):
    tokenizer = _tokenizer(trained_dirs["tokenizers"])
    text = "\u2581 literal lower one eighth block \u2581\u2581"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids(trained):
    tokenizer = _tokenizer(trained[1])
    for expected_id, token in enumerate(SpecialTokens().as_list()):
        assert tokenizer.encode(token, add_special_tokens=False).ids == [expected_id]
        assert tokenizer.token_to_id(token) == expected_id
    # Text that merely resembles a special token never produces one.
    ids = tokenizer.encode("<｜fim▁ho <｜end▁of▁sentence", add_special_tokens=False).ids
    assert not set(ids) & set(range(len(SpecialTokens().as_list())))


def test_split_table_is_valid(trained):
    tokenizer = _tokenizer(trained[1])
    table = json.loads((trained[1] / "split_table.json").read_text())
    assert len(table) >= 5  # Python code is full of '):\n', ',\n', '.\n\n' ...
    for token_id, pieces in table.items():
        text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
        assert "\n" in text or "\r" in text
        assert len(pieces) >= 2 and all(0 <= p < tokenizer.get_vocab_size() for p in pieces)
        assert tokenizer.decode(pieces, skip_special_tokens=False) == text


def test_transformers_autotokenizer_loads_the_directory(trained, held_out):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(trained[1])
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    text = held_out[0]
    assert loaded.decode(loaded.encode(text), skip_special_tokens=False) == text


def test_sentencepiece_model_agrees_with_tokenizer_json(trained_dirs, held_out):
    processor = spm.SentencePieceProcessor(model_file=str(trained_dirs["sentencepiece"] / "tokenizer.model"))
    tokenizer = _tokenizer(trained_dirs["sentencepiece"])
    for text in held_out[:40]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == processor.encode(text)


def test_report_describes_the_run(trained):
    report = (trained[1] / "report.txt").read_text()
    for key in ["vocab_size: 1024", "training_bytes:", "training_seconds:", "heldout_bytes_per_token:", "fingerprint:"]:
        assert key in report


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, capsys, corpus):
    out = tmp_path / "out"
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    assert "no non-empty text" in _error(capsys, ["--input", str(empty), "--vocab-size", "300", "--output", str(out)])
    wrong_field = write_jsonl(tmp_path / "wrong.jsonl", ["hello"], field="content")
    message = _error(capsys, ["--input", str(wrong_field), "--vocab-size", "300", "--output", str(out)])
    assert "wrong.jsonl" in message and "'text' not found" in message
    message = _error(capsys, ["--input", str(corpus), "--vocab-size", "100", "--output", str(out)])
    assert "--vocab-size 100" in message and "262" in message
    assert "no file matches" in _error(capsys, ["--input", str(tmp_path / "*.parquet"), "--vocab-size", "300",
                                                "--output", str(out)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    assert "bad.jsonl: line 2: invalid JSON" in _error(capsys, ["--input", str(bad), "--vocab-size", "300",
                                                                  "--output", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl", "wrong.jsonl"]


def test_existing_output_needs_overwrite(tmp_path, capsys, corpus):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert "--overwrite" in _error(capsys, ["--input", str(corpus), "--vocab-size", "300", "--output", str(out)])
    assert (out / "old.txt").read_text() == "keep me"
    assert _train(corpus, out, "--overwrite", "--max-bytes", "200000") == 0
    assert not (out / "old.txt").exists() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary directories left


def test_console_script_and_module_entry_point(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("\n".join(prose_documents(limit=50)))
    result = subprocess.run(
        [sys.executable, "-m", "tokenizer.train", "--input", str(txt), "--vocab-size", "400",
         "--output", str(tmp_path / "tok")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'tok'}/" in result.stdout
