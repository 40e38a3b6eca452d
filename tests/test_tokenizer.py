import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from tokenizer.chunking import bounded_chunks
from tokenizer.load import load_tokenizer_dir
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
    "\u2581 sentencepiece's space symbol \u2581\u2581 and noncharacters \ufdd0\ufdd1\ufdd2\ufdd0\u2581\ufdd0",
    "a" * 5000,
]
QUOTING_SPECIALS = ("A page quoting the control tokens: " + " ".join(SpecialTokens().as_list())
                    + "\nand glued together:" + "".join(SpecialTokens().as_list()) + "<｜end▁of▁sentence｜>.")


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
    bundle = load_tokenizer_dir(trained[1])
    for text in held_out + ADVERSARIAL:
        assert bundle.decode(bundle.encode(text)) == text
    assert bundle.vocab_size == 1024


def test_special_token_text_in_a_document_stays_text(trained):
    """A document quoting every special token encodes as text: no control id, same characters back."""
    bundle = load_tokenizer_dir(trained[1])
    controls = {bundle.tokenizer.token_to_id(token) for token in SpecialTokens().as_list()}
    ids = bundle.encode(QUOTING_SPECIALS)
    assert not controls & set(ids)
    assert bundle.decode(ids) == QUOTING_SPECIALS
    batched = bundle.tokenizer.encode_batch_fast([QUOTING_SPECIALS], add_special_tokens=False)  # the pipeline's call
    assert batched[0].ids == ids


def test_transformers_keeps_special_token_text_as_text(trained):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(trained[1])
    ids = loaded(QUOTING_SPECIALS, add_special_tokens=False).input_ids
    assert not set(loaded.all_special_ids) & set(ids)
    assert loaded.decode(ids) == QUOTING_SPECIALS


def test_sentencepiece_model_declares_specials_as_control_symbols(trained_dirs):
    """sentencepiece never matches control symbols in text (user-defined symbols it would)."""
    processor = spm.SentencePieceProcessor(model_file=str(trained_dirs["sentencepiece"] / "tokenizer.model"))
    specials = SpecialTokens().as_list()
    assert [processor.id_to_piece(i) for i in range(len(specials))] == specials
    assert all(processor.is_control(i) for i in range(len(specials)))
    assert not set(range(len(specials))) & set(processor.encode(QUOTING_SPECIALS))


@pytest.mark.parametrize("fim_rate", ["0", "1"])
def test_prepare_output_holds_only_the_control_ids_it_inserted(trained, tmp_path, fim_rate):
    from data_pipeline.prepare import main as prepare_main

    corpus = write_jsonl(tmp_path / "quoting.jsonl", [QUOTING_SPECIALS])
    out = tmp_path / "packed"
    assert prepare_main(["--input", str(corpus), "--tokenizer", str(trained[1]), "--seq-len", "1024",
                         "--output", str(out), "--fim-rate", fim_rate, "--split-rate", "0"]) == 0
    bundle = load_tokenizer_dir(trained[1])
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.concatenate([np.load(out / shard).ravel() for shard in manifest["shards"]]).tolist()
    controls = [bundle.tokenizer.token_to_id(token) for token in SpecialTokens().as_list()]
    inserted = {bundle.bos_id: 1, bundle.eos_id: 1, bundle.pad_id: manifest["padding_tokens"]}
    if fim_rate == "1":
        inserted.update({bundle.fim_begin_id: 1, bundle.fim_hole_id: 1, bundle.fim_end_id: 1})
    assert {token: tokens.count(token) for token in controls} == {token: inserted.get(token, 0) for token in controls}
    if fim_rate == "0":
        assert tokens[0] == bundle.bos_id and bundle.decode(tokens[1:tokens.index(bundle.eos_id)]) == QUOTING_SPECIALS


def test_special_tokens_are_single_ids_in_tokenizer_json(trained):
    """tokenizer.json registers them as special added tokens 0-5 (matched only where a caller asks)."""
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


def test_a_much_smaller_vocabulary_than_requested_is_one_warning(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", prose_documents(limit=3))
    assert main(["--input", str(corpus), "--vocab-size", "1000000", "--output", str(tmp_path / "tok")]) == 0
    trained = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert trained < 10_000 and len(warnings) == 1
    assert warnings[0].startswith("warning: --vocab-size 1000000") and f"only {trained} tokens" in warnings[0]


def test_bounded_chunks_cover_the_text_and_cut_after_line_breaks():
    code, unbroken = "".join(code_documents(limit=5)), "x" * 20000
    chunks = list(bounded_chunks([code], max_chars=4096))
    assert "".join(chunks) == code and all(0 < len(c) <= 4096 for c in chunks)
    assert all(c.endswith("\n") for c in chunks[:-1])
    assert list(bounded_chunks([unbroken, ""], 4096)) == [unbroken[i : i + 4096] for i in range(0, 20000, 4096)]


PEAK_RSS = """
import resource, sys
from text_sources.reading import iter_texts
from tokenizer.train import main
if sys.argv[1] == "train":
    assert main(["--input", sys.argv[2], "--vocab-size", "2000", "--output", sys.argv[3]]) == 0
else:
    sum(map(len, iter_texts([sys.argv[2]])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_one_long_document_trains_in_bounded_memory(tmp_path):
    """Training on one 8 MB document costs little beyond reading it (it cost ~96 bytes per byte)."""
    document = tmp_path / "one.txt"
    text = "".join(code_documents())
    document.write_text((text * (8_000_000 // len(text) + 1))[:8_000_000])
    peaks = {}
    for mode in ("read", "train"):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, mode, str(document), str(tmp_path / "tok")],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        peaks[mode] = int(result.stdout.split()[-1]) * 1024
    assert peaks["train"] - peaks["read"] < 160 << 20, peaks
