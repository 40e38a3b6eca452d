"""DeepSeek's FP8 release format (the official V3 weights), read and written. The oracle is this
file's own writer, which follows DeepSeek's published kernels (``inference/kernel.py``:
``weight_quant`` scale = 128x128 block amax / 448, ``weight_dequant`` value = fp8 x block scale),
and transformers' logits on the dequantised weights."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from plugins.errors import ConfigError
from plugins.interop.hf import config_from_hf, hf_tensors, load_hf_checkpoint, save_hf_checkpoint

from .conftest import random_hf_model, save_hf

BLOCK = 128
E4M3 = torch.float8_e4m3fn
# Dimensions that are not multiples of 128 (partial blocks on both axes) beside ones that are.
DIMS = dict(vocab_size=200, hidden_size=160, intermediate_size=300, moe_intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=40, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
            num_nextn_predict_layers=1)
QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def weight_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's ``weight_quant``, block by block: s = amax / 448, y = (x / s) in E4M3."""
    rows, cols = x.shape
    y = torch.empty(rows, cols, dtype=E4M3)
    s = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = x[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s[i, j] = block.abs().max() / 448.0
            y[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s[i, j]).to(E4M3)
    return y, s


def weight_dequant(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """DeepSeek's ``weight_dequant``, block by block: x = y * s."""
    x = torch.empty(y.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            x[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = \
                y[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float() * s[i, j]
    return x


def quantized_in_release(key: str) -> bool:
    """The release quantises the linears of attention, dense FFNs, shared and routed experts (not the
    MTP module's eh_proj, nor the router, norms, embedding and head)."""
    return re.search(r"\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight$", key) is not None


def write_directory(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """safetensors shards + index + config.json; the block scales in a shard of their own (the release
    keeps most beside their weights, but a reader may not count on it)."""
    directory.mkdir(parents=True)
    parts = [sorted(k for k in tensors if not k.endswith("_scale_inv")), sorted(k for k in tensors if k.endswith("_scale_inv"))]
    parts = [part for part in parts if part]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


def tensors_of(directory) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-format directory written with DeepSeek's algorithm from a random transformers
    DeepseekV3 (the MTP module as layer num_hidden_layers) and its dequantised weights:
    (directory, its tensors, its config, {key: dequantised FP32 tensor})."""
    root = tmp_path_factory.mktemp("release")
    with_mtp_layer = random_hf_model(**{**DIMS, "num_hidden_layers": 3})
    plain = save_hf(with_mtp_layer, root / "plain")
    source = tensors_of(plain)
    mtp = f"model.layers.{DIMS['num_hidden_layers']}"
    hidden = DIMS["hidden_size"]
    source.update({f"{mtp}.enorm.weight": 1 + 0.1 * torch.randn(hidden), f"{mtp}.hnorm.weight": 1 + 0.1 * torch.randn(hidden),
                   f"{mtp}.eh_proj.weight": 0.1 * torch.randn(hidden, 2 * hidden),
                   f"{mtp}.shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden),
                   f"{mtp}.embed_tokens.weight": source["model.embed_tokens.weight"],
                   f"{mtp}.shared_head.head.weight": source["lm_head.weight"]})
    tensors, dequantised = {}, {}
    for key, value in source.items():
        if quantized_in_release(key):
            tensors[key], tensors[key + "_scale_inv"] = weight_quant(value)
            dequantised[key] = weight_dequant(tensors[key], tensors[key + "_scale_inv"])
        else:
            tensors[key] = value if key.endswith("e_score_correction_bias") else value.to(torch.bfloat16)
            dequantised[key] = tensors[key].float()
    config = {**json.loads((plain / "config.json").read_text()), "num_hidden_layers": DIMS["num_hidden_layers"],
              "quantization_config": QUANTIZATION}
    write_directory(root / "fp8", tensors, config)
    return root / "fp8", tensors, config, dequantised


def _load(directory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_hf_checkpoint(directory, **kwargs).eval()


def test_release_format_loads_as_transformers_on_the_dequantised_weights(release, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, tensors, config, dequantised = release
    assert any(v.dtype == E4M3 and (v.shape[0] % BLOCK or v.shape[1] % BLOCK) for v in tensors.values())
    ours = _load(directory)
    for name, value in ours.state_dict().items():  # the MTP module included
        for key, expected in hf_tensors(name, value, ours.config):
            assert torch.equal(expected, dequantised[key]), key
    reference_dir = tmp_path / "dequantised"
    write_directory(reference_dir, dequantised, {k: v for k, v in config.items() if k != "quantization_config"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(reference_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, DIMS["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_release_format_dequantises_into_the_model_dtype(release):
    directory, _, _, dequantised = release
    model = _load(directory, dtype=torch.bfloat16)
    q_b = model.layers["1"].self_attn.q_b_proj.weight
    assert q_b.dtype == torch.bfloat16
    assert torch.equal(q_b, dequantised["model.layers.1.self_attn.q_b_proj.weight"].to(torch.bfloat16))


def test_fp8_export_is_the_release_algorithm_and_reads_back(release, tmp_path):
    directory = release[0]
    model = _load(directory)
    save_hf_checkpoint(model, tmp_path / "out", max_shard_bytes=256 * 1024, fp8=True)
    written = tensors_of(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION and config["torch_dtype"] == "bfloat16"
    originals = {k: v for name, t in model.state_dict().items() for k, v in hf_tensors(name, t, model.config)}
    assert {k for k, v in written.items() if v.dtype == E4M3} == {k for k in originals if quantized_in_release(k)}
    for key, value in written.items():
        if key.endswith("_scale_inv"):
            assert index[key] == index[key.removesuffix("_scale_inv")]  # a weight and its scales in one shard
            continue
        if value.dtype == E4M3:
            data, scale = weight_quant(originals[key])
            assert torch.equal(value.view(torch.uint8), data.view(torch.uint8)) and torch.equal(written[key + "_scale_inv"], scale), key
        elif key.endswith("e_score_correction_bias"):
            assert value.dtype == torch.float32 and torch.equal(value, originals[key]), key
        else:
            assert value.dtype == torch.bfloat16 and torch.equal(value, originals[key].to(torch.bfloat16)), key
    again = _load(tmp_path / "out")
    for name, value in again.state_dict().items():
        for key, got in hf_tensors(name, value, again.config):
            expected = weight_dequant(written[key], written[key + "_scale_inv"]) if key + "_scale_inv" in written \
                else written[key].float()
            assert torch.equal(got, expected), key


def _broken(release, tmp_path, change_tensors=None, change_config=None):
    directory, tensors, config, _ = release
    tensors, config = dict(tensors), json.loads(json.dumps(config))
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    write_directory(tmp_path / "broken", tensors, config)
    return tmp_path / "broken"


GATE = "model.layers.0.mlp.gate_proj.weight"
BAD_INPUTS = {
    "scale of the wrong shape": (lambda t: t.update({GATE + "_scale_inv": torch.ones(2, 2)}), None,
                                 rf"{GATE}_scale_inv: shape \(2, 2\), expected \(3, 2\)"),
    "missing scale": (lambda t: t.pop(GATE + "_scale_inv"), None, rf"{GATE}: FP8 weight without its block scales"),
    "a quantised linear in BF16": (lambda t: t.update({GATE: t[GATE].to(torch.bfloat16)}) or t.pop(GATE + "_scale_inv"),
                                   None, rf"{GATE}: BF16 without block scales where \S+/config.json's quantization_config"),
    "FP8 norm": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(E4M3),
                                     "model.norm.weight_scale_inv": torch.ones(1, 1)}),
                 None, r"model\.norm\.weight: float8_e4m3fn where the FP8 release format keeps BF16"),
    "FP8 router": (lambda t: t.update({"model.layers.1.mlp.gate.weight": t["model.layers.1.mlp.gate.weight"].to(E4M3)}),
                   None, r"model\.layers\.1\.mlp\.gate\.weight: float8_e4m3fn where"),
    "another FP8 format": (lambda t: t.update({GATE: t[GATE].to(torch.float8_e5m2)}), None,
                           rf"{GATE}: F8_E5M2, expected F8_E4M3"),
    "scale without FP8 weight": (lambda t: t.update({"lm_head.weight_scale_inv": torch.ones(2, 2)}), None,
                                 r"lm_head\.weight_scale_inv: a block scale without an FP8 weight"),
    "another quant_method": (None, lambda c: c["quantization_config"].update(quant_method="awq"),
                             r"quantization_config\.quant_method: expected 'fp8'"),
    "another block size": (None, lambda c: c["quantization_config"].update(weight_block_size=[64, 64]),
                           r"quantization_config\.weight_block_size: expected \[128, 128\] .*got \[64, 64\]"),
    "no quantization_config": (None, lambda c: c.pop("quantization_config"),
                               r"safetensors: model\.layers\.\d\.\S+\.weight: float8_e4m3fn, but \S+/config.json has no quantization_config"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_release_input_is_one_line_naming_the_key(release, tmp_path, case):
    change_tensors, change_config, message = BAD_INPUTS[case]
    with pytest.raises(ConfigError, match=message) as error:
        load_hf_checkpoint(_broken(release, tmp_path, change_tensors, change_config))
    assert "\n" not in str(error.value)


def test_a_bad_release_through_launch_evaluate_is_one_error_line(release, tmp_path, capfd, tokenizer_dir):
    from launch.evaluate import main as evaluate

    from .test_cli_probes import probe

    broken = _broken(release, tmp_path, BAD_INPUTS["missing scale"][0])
    (tmp_path / "held_out.jsonl").write_text('{"text": "def f(): pass"}\n')
    probe(capfd, lambda: evaluate(["--model", str(broken), "--tokenizer", str(tokenizer_dir), "--data",
                                   str(tmp_path / "held_out.jsonl"), "--output", str(tmp_path / "out.json")]),
          f"{GATE}: FP8 weight without its block scales", tmp_path / "out.json")


# The fields of DeepSeek-V3's config.json, and the model_type Kimi-K2 ships with the same architecture.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": QUANTIZATION, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
KIMI_K2 = {**V3_CONFIG, "model_type": "kimi_k2", "num_attention_heads": 64, "num_key_value_heads": 64,
           "n_routed_experts": 384, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
           "routed_scaling_factor": 2.827, "vocab_size": 163840, "num_nextn_predict_layers": 0, "rope_theta": 50000.0,
           "rope_scaling": {**V3_CONFIG["rope_scaling"], "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0}}


def test_deepseek_v3_and_kimi_k2_configs_are_read():
    v3 = config_from_hf(V3_CONFIG, "v3/config.json")
    assert (v3.num_hidden_layers, v3.n_routed_experts, v3.rope_scaling.factor) == (61, 256, 40)
    kimi = config_from_hf(KIMI_K2, "kimi/config.json")
    assert (kimi.n_routed_experts, kimi.num_attention_heads, kimi.routed_scaling_factor) == (384, 64, 2.827)


def test_the_domain_stage_config_builds_the_released_model():
    """``configs/deepseek_v3_base_domain.yaml`` (docs/checkpoints.md) is DeepSeek-V3-Base's architecture,
    rope scaling included, so ``--init-from`` the release fills it."""
    from launch.config.run_config import load_run_config

    from .conftest import ROOT

    ours = load_run_config(ROOT / "configs" / "deepseek_v3_base_domain.yaml").model
    release = config_from_hf(V3_CONFIG, "v3/config.json")
    own = {"aux_loss_alpha", "initializer_range", "balance", "mtp_loss_weight", "source"}
    assert {k: v for k, v in vars(ours).items() if k not in own} == {k: v for k, v in vars(release).items() if k not in own}


@pytest.mark.parametrize("change,message", [
    ({"attention_dropout": 0.1}, "kimi/config.json: attention_dropout: expected 0.0"),
    ({"sliding_window": 4096}, "kimi/config.json: sliding_window: not a field this model implements"),
    ({"num_key_value_heads": 8}, "kimi/config.json: num_key_value_heads: expected 64"),
    ({"architectures": ["LlamaForCausalLM"]}, "kimi/config.json: model_type 'kimi_k2' with architectures"),
])
def test_a_field_the_model_cannot_honour_is_one_line_naming_it(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_hf({**KIMI_K2, **change}, "kimi/config.json")


# ------------------------------------------------------------------ a trained run through the format
@pytest.fixture(scope="module")
def exports(embedded_run, tmp_path_factory):
    """The tiny recipe's run exported twice by ``launch.convert``: plain (its FP32 master weights) and
    ``--fp8``. Returns (plain dir, FP8 dir, the run's data)."""
    from launch.convert import main as convert

    root = tmp_path_factory.mktemp("exports")
    run_dir, data = embedded_run[0], embedded_run[1]
    assert convert([str(run_dir), str(root / "plain")]) == 0
    assert convert([str(run_dir), str(root / "fp8"), "--fp8"]) == 0
    return root / "plain", root / "fp8", data


def test_fp8_export_round_trips_within_e4m3_error_and_keeps_the_held_out_loss(exports, tmp_path):
    from launch.evaluate import main as evaluate

    plain_dir, fp8_dir, data = exports
    plain, fp8 = tensors_of(plain_dir), tensors_of(fp8_dir)
    quantized = {k for k, v in fp8.items() if v.dtype == E4M3}
    assert quantized == {k for k in plain if quantized_in_release(k)} and quantized
    worst = 0.0
    for key in quantized:
        scale = fp8[key + "_scale_inv"]
        value = weight_dequant(fp8[key], scale)
        # round to nearest E4M3: half a step, 2^-4 of the value (normals) or 2^-10 of the block scale (subnormals)
        block_scale = scale.repeat_interleave(BLOCK, 0)[: value.shape[0]].repeat_interleave(BLOCK, 1)[:, : value.shape[1]]
        assert ((value - plain[key]).abs() <= 2**-4 * plain[key].abs() + 2**-10 * block_scale).all(), key
        worst = max(worst, ((value - plain[key]).norm() / plain[key].norm()).item())
    assert worst <= 2**-4
    for key in set(plain) - quantized:
        expected = plain[key] if key.endswith("e_score_correction_bias") else plain[key].to(torch.bfloat16)
        assert torch.equal(fp8[key], expected), key
    losses = {}
    for name, directory in (("plain", plain_dir), ("fp8", fp8_dir)):
        out = tmp_path / f"{name}.json"
        assert evaluate(["--model", str(directory), "--tokenizer", str(data["tokenizer"]), "--max-sequences", "16",
                         "--packed", *(f"{d}={p}" for d, p in data["validation"].items()), "--output", str(out)]) == 0
        losses[name] = {d: r["loss"] for d, r in json.loads(out.read_text())["packed"].items()}
    print(f"worst relative Frobenius error {worst:.4f}; held-out loss {losses}")
    for domain, loss in losses["plain"].items():
        assert abs(losses["fp8"][domain] - loss) <= 0.01 * loss, (domain, losses)


def _read_by_rank(rank: int, world: int, fp8_dir: str, results) -> None:
    """One rank of (pp 2, ep 2, dp 2) builds its part from the FP8 directory as the trainer does;
    every tensor it reads from the safetensors files is recorded."""
    import deepspeed

    import plugins.interop.hf as hf
    from launch.config.run_config import load_run_config
    from launch.distributed.groups import build_groups
    from launch.training.parallelize import parallelize

    deepspeed.init_distributed(dist_backend="gloo")
    read: list[str] = []
    real = hf.safe_open

    class Counted:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    hf.safe_open = Counted
    run = load_run_config("configs/tiny.yaml", ["parallel.pp=2", "parallel.ep=2"])
    groups = build_groups(2, 2, run.parallel.pipeline_schedule, run.model)
    part = parallelize(run, groups, torch.device("cpu"), fp8_dir)
    held = {key for name, tensor in part.module.state_dict().items()
            for key, _ in hf.hf_tensors(name, tensor, run.model, part.expert_offset if ".experts." in name else 0)}
    results[rank] = {"read": read, "held": held, "dp_rank": groups.dp_rank}


def test_each_rank_of_pp2_ep2_reads_only_its_own_tensors(exports, tiny_config):
    import torch.multiprocessing as mp

    from .distributed import spawn

    fp8_dir = exports[1]
    results = mp.Manager().dict()
    spawn(_read_by_rank, 4, str(fp8_dir), results)
    stored = tensors_of(fp8_dir)
    per_ep_rank = tiny_config.n_routed_experts // 2
    readers: dict[str, list[dict]] = {}
    for rank in range(4):
        r = results[rank]
        assert len(r["read"]) == len(set(r["read"])), rank  # nothing read twice
        for key in r["read"]:
            readers.setdefault(key, []).append(r)
            expert = re.search(r"\.experts\.(\d+)\.", key)
            if expert:  # ep rank = position in the expert-parallel group of consecutive dp ranks
                assert int(expert[1]) // per_ep_rank == r["dp_rank"], (rank, key)
    mtp = tiny_config.num_hidden_layers
    mtp_copies = {k for k in stored if re.search(rf"layers\.{mtp}\.(embed_tokens|shared_head\.head)\.", k)}
    assert set(readers) == set(stored) - mtp_copies  # every tensor by some rank, the MTP copies by none
    for rank in range(4):  # a rank reads what it holds (an FP8 weight with its scales), nothing else
        held = results[rank]["held"] - mtp_copies
        assert set(results[rank]["read"]) == held | {k + "_scale_inv" for k in held if k + "_scale_inv" in stored}
    sizes = [sum(stored[k].numel() * stored[k].element_size() for k in results[rank]["read"]) for rank in range(4)]
    total = sum(stored[k].numel() * stored[k].element_size() for k in set(stored) - mtp_copies)
    print(f"bytes read per rank {sizes} of {total}")
    assert max(sizes) < total, sizes


def test_init_from_fp8_at_pp2_ep2_starts_with_the_one_rank_loss(exports, tmp_path):
    from .launcher import launch, metrics, ok

    fp8_dir, data = exports[1], exports[2]
    common = ("--steps", "1", "--init-from", str(fp8_dir), "--set", "train.micro_batch_size=1")
    one = ok(launch(1, tmp_path / "one", *common, data=data))
    ok(launch(4, tmp_path / "pp2ep2", *common, "--pp", "2", "--ep", "2", data=data))
    assert f"initialised the weights from {fp8_dir}" in one.stdout
    first, split = metrics(tmp_path / "one")[0]["loss"], metrics(tmp_path / "pp2ep2")[0]["loss"]
    print(f"step-1 loss: one rank {first}, pp2 x ep2 {split}")
    assert abs(first - split) <= 1e-5
