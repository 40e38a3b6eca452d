"""launch.evaluate against transformers' DeepseekV3 on the same text and weights."""

import json
import math

import pytest
import torch

from launch.evaluate import main as evaluate
from launch.evaluation.likelihood import windows
from tokenizer.load import load_tokenizer_dir

from .conftest import hf_reference_config, save_hf
from .corpus import prose_documents, write_jsonl


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tokenizer_dir):
    """A random transformers DeepseekV3ForCausalLM over the test tokenizer's 1024-token vocabulary."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_reference_config(vocab_size=1024, max_position_embeddings=512)).eval()
    return save_hf(model, tmp_path_factory.mktemp("eval") / "hf"), model


@pytest.fixture(scope="module")
def texts():
    """Six documents of Python's documentation, cut to at most 2,500 characters (~1,000 tokens: long
    enough for several windows of either size, short enough for a fast oracle)."""
    return [t[:2500] for t in prose_documents(limit=12) if t.strip()][:6]


def _reference_nll(model, ids: list[int], seq_len: int, stride: int) -> float:
    """Sum of NLL over ids[1:] computed straight from transformers, window by window."""
    total, scored = 0.0, 1
    while scored < len(ids):
        end = min(scored + (stride if scored > 1 else seq_len - 1), len(ids))
        start = max(0, end - seq_len)
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:end]])).logits[0].double()
        logp = logits.log_softmax(-1)
        total -= logp[torch.arange(scored - start - 1, end - start - 1), torch.tensor(ids[scored:end])].sum().item()
        scored = end
    return total


@pytest.mark.parametrize("seq_len,stride,documents,chars", [(512, 256, 6, 2500), (48, 16, 2, 1200)])
def test_bits_per_byte_equals_transformers(hf_model, tokenizer_dir, texts, tmp_path, capsys, seq_len, stride,
                                           documents, chars):
    directory, model = hf_model
    texts = [t[:chars] for t in texts[:documents]]
    data = write_jsonl(tmp_path / "heldout.jsonl", texts)
    assert evaluate(["--model", str(directory), "--tokenizer", str(tokenizer_dir), "--data", str(data),
                     "--seq-len", str(seq_len), "--stride", str(stride), "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "eval.json").read_text())
    tokenizer = load_tokenizer_dir(tokenizer_dir)
    nll = sum(_reference_nll(model, [tokenizer.bos_id, *tokenizer.encode(t)], seq_len, stride) for t in texts)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["bytes"] == text_bytes and result["documents"] == len(texts)
    expected = nll / (math.log(2) * text_bytes)
    assert abs(result["bits_per_byte"] - expected) / expected <= 1e-4


def test_windows_score_every_token_once_with_bounded_context():
    for n, seq_len, stride in [(2, 8, 4), (100, 8, 4), (100, 16, 15), (7, 64, 32)]:
        scored = [t for start, end, first in windows(n, seq_len, stride) for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= seq_len for start, end, _ in windows(n, seq_len, stride))


def test_multiple_choice_picks_the_option_transformers_scores_best(hf_model, tokenizer_dir, tmp_path, capsys):
    """Scored against transformers: the option with the lowest NLL per byte wins."""
    directory, model = hf_model
    tokenizer = load_tokenizer_dir(tokenizer_dir)
    items = [{"context": "The quick brown fox", "options": [" jumps over the dog", " sat on a mat", " 123 456"],
              "answer": 0}, {"context": "def f(x):", "options": ["\n    return x", " zzz qqq"], "answer": 1}]
    expected = []
    for item in items:
        context = [tokenizer.bos_id, *tokenizer.encode(item["context"])]
        scores = []
        for option in item["options"]:
            option_ids = tokenizer.encode(option)
            full = _reference_nll(model, context + option_ids, 512, 256)
            prefix = _reference_nll(model, context, 512, 256)
            scores.append((full - prefix) / len(option.encode("utf-8")))
        expected.append(min(range(len(scores)), key=scores.__getitem__))
    path = tmp_path / "choices.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in items))
    assert evaluate(["--model", str(directory), "--tokenizer", str(tokenizer_dir), "--choices", str(path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["choices"]["predictions"] == expected
    assert result["choices"]["accuracy"] == sum(e == item["answer"] for e, item in zip(expected, items)) / len(items)


def test_bad_inputs_are_one_line_errors(hf_model, tokenizer_dir, tmp_path, capsys):
    directory, _ = hf_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "options": ["b"], "answer": 0}\n')
    assert evaluate(["--model", str(directory), "--tokenizer", str(tokenizer_dir), "--choices", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {bad}: line 1: expected")
    assert evaluate(["--model", str(directory), "--data", str(bad)]) == 2
    assert "a HF directory needs --tokenizer" in capsys.readouterr().err
    assert evaluate(["--model", str(tmp_path), "--data", str(bad)]) == 2
    assert "not a run directory" in capsys.readouterr().err
