"""Hostile-input probes of the readers below the CLIs (issue 38): a foreign or damaged HF directory,
YaRN fields as transformers applies them, the planner's batch check, the optimizer's ranges, a
dataset path that does not exist, a tokenizer whose end token is its begin token. Each is one
``ConfigError`` line naming the file, field or flag, never a traceback or a silent reading."""

import dataclasses
import json
import shutil
import warnings

import pytest
import torch

from plugins.errors import ConfigError

from .conftest import ROOT, random_hf_model, save_hf


def _one_line(call, *names: str) -> str:
    with pytest.raises(ConfigError) as error:
        call()
    line = str(error.value)
    assert "\n" not in line
    for name in names:
        assert name in line, line
    return line


# --------------------------------------------------------------------------- HF directories
def _index(directory, content: str) -> None:
    (directory / "model.safetensors.index.json").write_text(content)


def _config(directory, change) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


FOREIGN = {  # case -> (change to a copy of a good HF directory, what the line names)
    "index not JSON": (lambda d: _index(d, "{not json"), "model.safetensors.index.json: not JSON"),
    "index without weight_map": (lambda d: _index(d, '{"metadata": {}}'), "model.safetensors.index.json: weight_map"),
    "index a list": (lambda d: _index(d, "[]"), "model.safetensors.index.json: expected an object"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    "rope_scaling a string": (lambda d: _config(d, lambda c: {**c, "rope_scaling": "yarn", "rope_parameters": None}),
                              "config.json: rope_scaling: expected a mapping"),
    "rope_theta a string": (lambda d: _config(d, lambda c: {**c, "rope_parameters": None, "rope_theta": "big"}),
                            "config.json: model.rope_theta: expected a number"),
    "llama": (lambda d: _config(d, lambda c: {**c, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
              "config.json: model_type 'llama' with architectures ['LlamaForCausalLM']"),
    "a YaRN field not applied": (lambda d: _config(d, lambda c: {**c, "rope_parameters": {
        **c["rope_parameters"], "partial_rotary_factor": 0.5}}), "rope_scaling.partial_rotary_factor: unknown key"),
}


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return save_hf(random_hf_model(), tmp_path_factory.mktemp("foreign") / "good")


@pytest.mark.parametrize("case", FOREIGN)
def test_a_foreign_hf_directory_is_one_line_for_every_reader(case, good_hf, tmp_path):
    """evaluate/generate/niah/lm-eval (``load_model``) and ``--init-from`` (``read_weights``) read
    config.json and the index through one reader, and refuse the same things with the same line."""
    from launch.checkpointing.model_source import load_model, read_weights
    from plugins.interop.hf import read_hf_config
    from plugins.model.deepseek_v3 import DeepSeekV3

    change, names = FOREIGN[case]
    model = DeepSeekV3(dataclasses.replace(read_hf_config(good_hf), num_nextn_predict_layers=0))
    read_weights(good_hf, model)  # the directory before the change is read
    directory = shutil.copytree(good_hf, tmp_path / "foreign")
    change(directory)
    _one_line(lambda: load_model(directory), names)
    _one_line(lambda: read_weights(directory, model), f"--init-from {directory}", names)


ROPE = {  # transformers' YaRN fields beyond the report's two mscales, each applied as transformers does
    "attention_factor": {"attention_factor": 0.8, "mscale": 0.8, "mscale_all_dim": 0.7},
    "no mscales": {},
    "mscale_all_dim only": {"mscale_all_dim": 0.7},
    "untruncated ramp": {"mscale": 1.0, "mscale_all_dim": 1.0, "truncate": False, "beta_fast": 4, "beta_slow": 0.5},
}


@pytest.mark.parametrize("case", ROPE)
def test_yarn_fields_are_applied_as_transformers_applies_them(case, tmp_path):
    """transformers' DeepseekV3 (its own ``_compute_yarn_parameters`` and ``yarn_apply_mscale``) is the
    oracle: the logits of the same weights through both models agree."""
    from plugins.interop.hf import load_hf_checkpoint

    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
            **ROPE[case]}
    reference = random_hf_model(rope_scaling=rope).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_hf_checkpoint(save_hf(reference, tmp_path / "hf")).eval()
    ids = torch.randint(0, 160, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- launch.plan
@pytest.mark.parametrize("flags,names", [
    (["--micro-batch", "3"], "micro_batch_size x data-parallel ranks = 3 x 1; fix: --set train.batch.start=6"),
    (["--dp", "3"], "micro_batch_size x data-parallel ranks = 4 x 3; fix: --set train.batch.start=12"),
    (["--micro-batch", "1000000"], "micro_batch_size x data-parallel ranks = 1000000 x 1"),
    (["--dp", "1000000000000"], "micro_batch_size x data-parallel ranks = 4 x 1000000000000"),
])
def test_plan_refuses_the_batch_the_trainer_refuses(flags, names, capfd):
    """The planner checks the batch with the trainer's own check (``check_schedule``), so the line is
    the one ``launch/pretrain.py`` prints for the same layout."""
    from launch.plan import main

    from .test_cli_probes import probe

    line = probe(capfd, lambda: main([str(ROOT / "configs" / "tiny.yaml"), *flags]), names)
    assert "train.batch.start: 8 sequences is not a multiple of" in line


# --------------------------------------------------------------------------- optimizer ranges
@pytest.mark.parametrize("setting,names", [
    ("train.betas=[1.5,0.95]", "train.betas[0]: expected 0 <= beta < 1, got 1.5"),
    ("train.betas=[0.9,1.0]", "train.betas[1]: expected 0 <= beta < 1, got 1.0"),
    ("train.betas=[-0.1,0.95]", "train.betas[0]"),
    ("train.eps=0", "train.eps: must be positive"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
    ("train.lr.peak=0", "train.lr.peak: must be positive"),
    ("train.lr.final=-1e-5", "train.lr.final: must be >= 0"),
    ("train.lr.cosine_final=-1e-5", "train.lr.cosine_final: must be >= 0"),
    ("train.lr.warmup_steps=-1", "train.lr.warmup_steps: must be >= 0"),
    ("train.lr.cosine_tokens=-1", "train.lr.cosine_tokens: must be >= 0"),
])
def test_pretrain_refuses_an_optimizer_setting_torch_would_raise_on(setting, names, tmp_path, capfd):
    from launch.pretrain import main

    from .test_cli_probes import probe

    run_dir = tmp_path / "run"
    probe(capfd, lambda: main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir),
                               "--set", setting]), names, run_dir)


# --------------------------------------------------------------------------- a typo in a dataset path
@pytest.mark.parametrize("sets,names", [
    (["data.dataset={cache}/pakced"], "data.dataset: {cache}/pakced is missing; data.builtin_corpus builds it only "
                                      "in a directory named 'packed'"),
    (["data.dataset={cache}/packed", "data.validation={{code: {cache}/val/cdoe}}", "train.eval_interval=10"],
     "data.validation.code: {cache}/val/cdoe is missing; data.builtin_corpus builds it only in a directory named 'code'"),
])
def test_a_typo_inside_the_embedded_cache_is_not_built(sets, names, tokenizer_dir, tmp_path):
    """docs/training.md: a typo in ``data.dataset`` never trains on the standard library, also inside
    the embedded corpus's cache directory: one line naming the key and the path, nothing written."""
    from launch.config.run_config import load_run_config
    from launch.training.data import setup_data

    cache = tmp_path / "cache"
    shutil.copytree(tokenizer_dir, cache / "tokenizer")
    (cache / "python-corpus.jsonl").write_text('{"text": "def f(): pass"}\n')  # the embedded tokenizer's corpus
    overrides = [f"data.tokenizer={cache / 'tokenizer'}", "data.seq_len=128", "data.validation={}",
                 *(s.format(cache=cache) for s in sets)]
    run = load_run_config(ROOT / "configs" / "tiny.yaml", overrides)
    _one_line(lambda: setup_data(run, rank=0), names.format(cache=cache))
    assert sorted(p.name for p in cache.iterdir()) == ["python-corpus.jsonl", "tokenizer"]


# --------------------------------------------------------------------------- special tokens in prepare
@pytest.mark.parametrize("key,twin,names", [
    ("eos_token", "bos_token", "bos_token and eos_token are both '<｜begin▁of▁sentence｜>': special tokens must be distinct"),
    ("pad_token", "eos_token", "eos_token and pad_token are both '<｜end▁of▁sentence｜>': special tokens must be distinct"),
])
def test_prepare_refuses_a_tokenizer_whose_special_tokens_coincide(key, twin, names, tokenizer_dir, tmp_path, capfd):
    """``tokenizer.train`` refuses ``--eos-token`` equal to ``--bos-token``; ``data_pipeline.prepare``
    refuses a tokenizer directory that says the same, with the same check (documents would end in the
    token that begins them)."""
    from data_pipeline.prepare import main

    from .test_cli_probes import probe

    tok = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, key: config[twin]}))
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "def f(): pass"}\n')
    out = tmp_path / "out"
    probe(capfd, lambda: main(["--input", str(data), "--tokenizer", str(tok), "--seq-len", "64", "--output", str(out)]),
          f"{tok / 'tokenizer_config.json'}: {names}", out)
