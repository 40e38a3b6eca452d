"""Inference on the tiny model trained by the README's main job: latent-cache decoding, MTP
speculative decoding, evaluation of a run directory, needle in a haystack, and the long-context
stages started from the pre-trained run."""

import json

import numpy as np
import pytest
import torch

from launch.checkpointing.model_source import load_model_and_tokenizer
from launch.evaluate import main as evaluate
from launch.evaluation.niah import build_prompt
from launch.generate import main as generate_cli
from launch.niah import main as niah
from plugins.inference.decoding import generate, generate_speculative

from .corpus import prose_documents, write_jsonl
from .launcher import launch, metrics, ok


@pytest.fixture(scope="module")
def trained(embedded_run):
    loaded, tokenizer = load_model_and_tokenizer(embedded_run[0], None)
    return loaded.model, tokenizer


PROMPTS = ["def main(argv):\n    ", "The list type is", "import os\nimport sys\n\n", "class Parser:\n    def "]


def test_latent_cache_decoding_equals_full_recomputation(trained):
    model, tokenizer = trained
    prompt = [tokenizer.bos_id, *tokenizer.encode(PROMPTS[0])]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generate(model, prompt, 24).tokens == ids[len(prompt):]


def test_speculative_decoding_gives_the_greedy_tokens(trained):
    model, tokenizer = trained
    drafted = accepted = 0
    for text in PROMPTS:
        prompt = [tokenizer.bos_id, *tokenizer.encode(text)]
        plain, fast = generate(model, prompt, 40), generate_speculative(model, prompt, 40)
        assert fast.tokens == plain.tokens, text
        assert fast.main_forwards <= plain.main_forwards - fast.accepted + 1  # each accepted draft saves a forward
        drafted, accepted = drafted + fast.drafted, accepted + fast.accepted
    assert 0 < accepted <= drafted  # both the accepting and the rejecting path ran


def test_generate_cli_reports_speculative_statistics(embedded_run, capsys):
    assert generate_cli(["--model", str(embedded_run[0]), "--prompt", PROMPTS[2], "--max-new-tokens", "16",
                         "--speculative", "mtp"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(err.strip().splitlines()[-1])
    assert out.startswith(PROMPTS[2]) and report["identical_to_greedy"] is True
    assert {"acceptance_rate", "tokens_per_s", "greedy_tokens_per_s", "speedup"} <= set(report)
    assert generate_cli(["--model", str(embedded_run[0]), "--prompt", "x", "--speculative", "mtp",
                         "--temperature", "0.7"]) == 2
    assert "decodes greedily" in capsys.readouterr().err


def test_evaluate_a_run_directory(embedded_run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "heldout.jsonl", prose_documents(limit=5))
    assert evaluate(["--model", str(embedded_run[0]), "--data", str(data), "--seq-len", "128"]) == 0
    result = json.loads((embedded_run[0] / "eval.json").read_text())
    assert result == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_byte = result["tokens"] / result["bytes"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2) * per_byte, rel=1e-9)
    assert result["bits_per_byte"] < np.log2(4096) * per_byte  # trained: below a uniform guess over the vocabulary


def test_needle_prompts_put_the_needle_at_its_depth(trained):
    _, tokenizer = trained
    haystack = tokenizer.encode(" ".join(prose_documents(limit=3)))
    needle = tokenizer.encode("\nThe secret passphrase is 31337.\n")
    for depth in (0.0, 0.5, 1.0):
        prompt = build_prompt(haystack, tokenizer, 200, depth, "31337", offset=7)
        assert len(prompt) == 200 and prompt[0] == tokenizer.bos_id
        at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
        room = 200 - 1 - len(needle) - len(tokenizer.encode("\nWhat is the secret passphrase? The secret passphrase is"))
        assert at == 1 + round(depth * room)


def test_needle_in_a_haystack_scores_an_oracle_perfectly(embedded_run, trained, tmp_path, monkeypatch):
    """The harness is right: a 'model' that reads the needle out of its prompt scores 1 everywhere."""
    import launch.evaluation.niah as harness

    tokenizer = trained[1]

    def oracle(model, prompt, max_new_tokens):
        text = tokenizer.decode(prompt)
        secret = text.split("The secret passphrase is ")[1][:5]
        return type("Decoded", (), {"tokens": tokenizer.encode(" " + secret + ".")})()

    monkeypatch.setattr(harness, "generate", oracle)
    assert niah(["--model", str(embedded_run[0]), "--lengths", "64", "96", "--depths", "0", "0.5", "1",
                 "--trials", "2", "--output", str(tmp_path)]) == 0
    assert all(c["score"] == 1.0 for c in json.loads((tmp_path / "niah.json").read_text())["cells"])


def test_needle_in_a_haystack_heatmap(embedded_run, tmp_path, capsys):
    assert niah(["--model", str(embedded_run[0]), "--lengths", "64", "128", "--depths", "0", "1", "--trials", "1",
                 "--output", str(tmp_path)]) == 0
    cells = json.loads((tmp_path / "niah.json").read_text())["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)]
    assert (tmp_path / "niah.png").stat().st_size > 1000
    assert niah(["--model", str(embedded_run[0]), "--lengths", "4096"]) == 2
    assert "positions" in capsys.readouterr().err


def test_long_context_stages_start_from_the_pretrained_run(embedded_run, tmp_path):
    """Report 4.3's two YaRN stages (scaled to the tiny model): each loads the previous weights
    and trains a few steps at its longer window."""
    run_dir, data = embedded_run[0], embedded_run[1]
    cache = data["dataset"].parent
    pretrained_loss = np.mean([r["lm_loss"] for r in metrics(run_dir)[-5:]])
    previous = run_dir
    for stage, seq_len in ((1, 256), (2, 512)):
        out = tmp_path / f"stage{stage}"
        result = ok(launch(1, out, "--steps", "2", "--init-from", str(previous),
                           "--set", f"data.dataset={cache / f'long_{seq_len}' / 'packed'}",
                           "--set", f"data.tokenizer={data['tokenizer']}", "--set", "data.builtin_megabytes=2",
                           "--set", "data.validation={}", config=f"configs/tiny_long_stage{stage}.yaml"))
        assert f"initialised the weights from {previous}" in result.stdout
        records = metrics(out)
        assert len(records) == 2 and records[0]["tokens"] == 2048 and records[0]["lr"] == 1e-4
        assert records[0]["lm_loss"] < pretrained_loss + 1.5  # a fresh model starts near ln(4096) = 8.3
        previous = out
