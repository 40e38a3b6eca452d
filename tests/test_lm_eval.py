"""launch.lm_eval_model (lm-eval model ``deepseek-pretrain``) against lm-eval's own ``hf`` model on the
same weights (a HF DeepseekV3 directory), offline over configs/eval's local task YAMLs and JSONL:
multiple choice, generation with exact match and rolling loglikelihood (bits per byte, also
against launch.evaluate)."""

import json

import pytest
import torch

from launch.evaluate import main as evaluate
from tokenizer.load import load_tokenizer_dir

from .conftest import ROOT, hf_reference_config, save_hf

pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the eval extra)")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from launch.checkpointing.model_source import load_model  # noqa: E402
from launch.evaluation.lm_eval import DeepSeekPretrainLM  # noqa: E402
from plugins.errors import ConfigError  # noqa: E402
from plugins.inference.decoding import generate  # noqa: E402

MAX_LENGTH = 64  # several rolling windows per long document; the 2-shot prompts are left-truncated


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers DeepseekV3ForCausalLM over the test tokenizer's 1024-token vocabulary."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_reference_config(vocab_size=1024, max_position_embeddings=512)).eval()
    return save_hf(model, tmp_path_factory.mktemp("lm_eval") / "hf")


@pytest.fixture(scope="module")
def runs(hf_dir, tokenizer_dir):
    """simple_evaluate's results (with samples) of the three local tasks: ours, and ``hf`` with BOS
    added to contexts (multiple choice, generation) and given only as the rolling prefix (bits per
    byte: with add_bos_token its rolling windows would score a second BOS), as ours does."""
    manager = TaskManager(include_path=str(ROOT / "configs" / "eval"), include_defaults=False)

    def run(model: str, model_args: str, tasks: list[str]) -> dict:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(ROOT)  # the YAMLs' data_files are relative to the repository root
            return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0)

    hf_args = f"pretrained={hf_dir},tokenizer={tokenizer_dir},dtype=float32,max_length={MAX_LENGTH}"
    ours = run("deepseek-pretrain", f"path={hf_dir},tokenizer={tokenizer_dir},max_length={MAX_LENGTH}",
               ["local_choice", "local_exact_match", "local_bpb"])
    hf = run("hf", hf_args + ",add_bos_token=True", ["local_choice", "local_exact_match"])
    hf_rolling = run("hf", hf_args, ["local_bpb"])
    return ours, {**hf["results"], **hf_rolling["results"]}, {**hf["samples"], **hf_rolling["samples"]}


def _responses(samples: list[dict]) -> list:
    return [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]


def test_registered_under_its_name():
    assert get_model("deepseek-pretrain") is DeepSeekPretrainLM


def test_multiple_choice_equals_hf(runs):
    ours, hf_results, hf_samples = runs
    mine, theirs = _responses(ours["samples"]["local_choice"]), _responses(hf_samples["local_choice"])
    assert len(mine) == len(theirs) == 8
    for doc_mine, doc_theirs in zip(mine, theirs):
        for [(ll, greedy)], [(ll_hf, greedy_hf)] in zip(doc_mine, doc_theirs, strict=True):
            assert abs(ll - ll_hf) <= 1e-4 and greedy == greedy_hf
    for metric in ("acc,none", "acc_norm,none", "acc_bytes,none"):
        assert ours["results"]["local_choice"][metric] == hf_results["local_choice"][metric]


def test_generation_and_exact_match_equal_hf(runs):
    ours, hf_results, hf_samples = runs
    mine, theirs = _responses(ours["samples"]["local_exact_match"]), _responses(hf_samples["local_exact_match"])
    assert len(mine) == 8 and mine == theirs
    assert ours["results"]["local_exact_match"]["exact_match,strip"] == hf_results["local_exact_match"]["exact_match,strip"]


def test_rolling_bits_per_byte_equal_hf_and_launch_evaluate(runs, hf_dir, tokenizer_dir, monkeypatch, capsys):
    ours, hf_results, hf_samples = runs
    mine, theirs = _responses(ours["samples"]["local_bpb"]), _responses(hf_samples["local_bpb"])
    assert len(mine) == 4
    for [[ll]], [[ll_hf]] in zip(mine, theirs, strict=True):
        assert abs(ll - ll_hf) <= 1e-4
    tokenizer = load_tokenizer_dir(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in (ROOT / "configs/eval/data/bpb.jsonl").read_text().splitlines()]
    assert max(len(tokenizer.encode(text)) for text in texts) > 3 * MAX_LENGTH  # several windows
    bpb = ours["results"]["local_bpb"]["bits_per_byte,none"]
    assert abs(bpb - hf_results["local_bpb"]["bits_per_byte,none"]) <= 1e-6 * bpb
    # lm-eval's disjoint windows of L inputs = launch.evaluate's windows of L+1 advanced by L
    monkeypatch.chdir(ROOT)
    assert evaluate(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--data", "configs/eval/data/bpb.jsonl",
                     "--seq-len", str(MAX_LENGTH + 1), "--stride", str(MAX_LENGTH)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["bits_per_byte"] - bpb) <= 1e-6 * bpb


def test_evaluate_tasks_front_writes_the_harness_json_beside_eval_json(hf_dir, tokenizer_dir, tmp_path, monkeypatch,
                                                                        capsys, runs):
    monkeypatch.chdir(ROOT)
    output = tmp_path / "run" / "eval.json"
    assert evaluate(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--data", "configs/eval/data/bpb.jsonl",
                     "--seq-len", str(MAX_LENGTH + 1), "--stride", str(MAX_LENGTH), "--tasks", "local_bpb,local_choice",
                     "--include-path", "configs/eval", "--batch-size", "3", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert abs(result["tasks"]["local_bpb"]["bits_per_byte,none"] - result["bits_per_byte"]) <= 1e-6 * result["bits_per_byte"]
    assert result["tasks"]["local_choice"]["acc,none"] == runs[0]["results"]["local_choice"]["acc,none"]
    harness = json.loads((output.parent / "lm_eval.json").read_text())
    assert harness["results"] == result["tasks"] and set(harness["configs"]) == {"local_bpb", "local_choice"}
    assert evaluate(["--model", str(hf_dir), "--tokenizer", str(tokenizer_dir), "--tasks", "local_bpb",
                     "--include-path", "no/such/dir"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --include-path no/such/dir: not a directory"


def test_batched_and_speculative_generation_equal_plain_greedy(hf_dir, tokenizer_dir):
    """Prompts of several lengths (two share one): batched latent-cache decoding, MTP speculative
    decoding (random MTP weights: mostly rejected drafts) and plugins.inference.decoding.generate
    give the same text."""
    loaded, tokenizer = load_model(hf_dir), load_tokenizer_dir(tokenizer_dir)
    contexts = ["def add(a, b):", "The quick brown fox", "The slow brown fox", "import os\nimport sys\n"]
    until = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, (context, until), index) for index, context in enumerate(contexts)]
    outputs = [DeepSeekPretrainLM(loaded, tokenizer, **options).generate_until(requests, disable_tqdm=True)
               for options in ({"batch_size": 1}, {"batch_size": 3}, {"speculative": "mtp"})]
    assert outputs[0] == outputs[1] == outputs[2]
    for context, text in zip(contexts, outputs[0]):
        tokens = generate(loaded.model, [tokenizer.bos_id, *tokenizer.encode(context)], 8, eos_id=tokenizer.eos_id).tokens
        plain = tokenizer.tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
        assert text == plain.split("\n\n")[0]


@pytest.mark.parametrize("args,message", [
    ({"ema": "maybe"}, "model_args ema=maybe: expected true or false"),
    ({"ema": True}, "--ema reads a run's checkpoint; a HF directory holds one set of weights"),
    ({"speculative": "beam"}, "model_args speculative=beam: expected mtp"),
    ({"batch_size": "auto"}, "batch_size auto: automatic batch sizes are not supported"),
    ({"max_length": 100000}, "model_args max_length=100000: expected 2 <= max_length <= 512"),
    ({"temperature": 0.5}, "model_args: unknown temperature (expected path, tokenizer"),
    ({"tokenizer": None}, "a HF directory needs model_args tokenizer=DIR"),
])
def test_bad_model_args_are_one_line_errors(hf_dir, tokenizer_dir, args, message):
    model_args = {"path": str(hf_dir), "tokenizer": str(tokenizer_dir), **args}
    with pytest.raises(ConfigError) as error:
        DeepSeekPretrainLM.create_from_arg_obj(model_args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_console_script_runs_lm_evals_cli_with_the_model_registered(hf_dir, tokenizer_dir, tmp_path):
    """``deepseek-lm-eval`` (the README's command line) evaluates a local task and writes lm-eval's
    results file."""
    import shutil
    import subprocess

    script = shutil.which("deepseek-lm-eval")
    assert script is not None, "pip install -e . installs the deepseek-lm-eval console script"
    result = subprocess.run([script, "--model", "deepseek-pretrain", "--model_args",
                             f"path={hf_dir},tokenizer={tokenizer_dir},max_length={MAX_LENGTH}",
                             "--tasks", "local_choice", "--include_path", "configs/eval", "--device", "cpu",
                             "--output_path", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1 and "local_choice" in json.loads(written[0].read_text())["results"]
    bad = subprocess.run([script, "--model", "deepseek-pretrain", "--model_args", f"path={hf_dir},ema=maybe",
                          "--tasks", "local_choice", "--include_path", "configs/eval"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: model_args ema=maybe:")
