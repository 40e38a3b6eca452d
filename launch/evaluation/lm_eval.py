"""The lm-evaluation-harness model ``deepseek-pretrain``: runs, checkpoints and HF DeepseekV3
directories on the field's harness (report 4.3/5.x benchmark formats: multiple choice, generation
with exact match, bits per byte). Importing this module registers the model with lm-eval's
registry (lm-eval 0.4 has no plugin entry point for models); ``launch.lm_eval_model`` is the
command line around it.

BOS as in ``launch.evaluate``: every scored text is ``<bos> context continuation``, and rolling
loglikelihoods score ``<bos> text`` through lm-eval's disjoint windows of ``max_length`` tokens
(the windows of ``launch.evaluate --seq-len max_length+1 --stride max_length``, so the bits per
byte agree). Loglikelihood requests run ``batch_size`` right-padded rows per forward (causal
attention never sees the padding). Generation decodes through the MLA latent cache, prompts of
equal token length ``batch_size`` at a time (the cache has no padding mask), each row until EOS,
a stop string or ``max_gen_toks``; ``speculative=mtp`` decodes greedy requests one at a time
with MTP drafting (the same tokens as greedy).
"""

from __future__ import annotations

import json
import sys
from itertools import groupby
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
from tqdm import tqdm

from launch.checkpointing.model_source import LoadedModel, load_model
from plugins.errors import ConfigError
from plugins.inference.decoding import generate_speculative, pick_token
from plugins.model.mla import LatentCache
from tokenizer.load import TokenizerBundle, load_tokenizer_dir

MODEL_ARGS = ("path", "tokenizer", "ema", "batch_size", "device", "max_length", "speculative")


def _positive_int(key: str, value) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"model_args {key}={value}: expected a positive integer")
    return number


@register_model("deepseek-pretrain")
class DeepSeekPretrainLM(TemplateLM):
    """``path``: a run, checkpoint or HF DeepseekV3 directory (or a ``LoadedModel``, with
    ``tokenizer`` a ``TokenizerBundle``); ``tokenizer``: a tokenizer directory (default: the run's);
    ``max_length``: tokens per forward (default: the model's positions); ``speculative=mtp``;
    ``ema=true``: a run's or checkpoint's EMA of the weights (``train.ema``), as ``launch.evaluate
    --ema``. Sampling (``do_sample``) draws from torch's global generator, which lm-eval seeds
    (``--seed``)."""

    backend = "causal"

    def __init__(self, path=None, tokenizer=None, ema=None, batch_size=1, device=None, max_length=None,
                 speculative=None, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"model_args: unknown {', '.join(sorted(unknown))} (expected {', '.join(MODEL_ARGS)})")
        if path is None:
            raise ConfigError("model_args: path=RUN_DIR|CHECKPOINT_DIR|HF_DIR is required")
        if ema not in (None, True, False):  # lm-eval reads ema=true / ema=false as booleans
            raise ConfigError(f"model_args ema={ema}: expected true or false")
        if speculative not in (None, "mtp"):
            raise ConfigError(f"model_args speculative={speculative}: expected mtp")
        if str(batch_size).startswith("auto"):
            raise ConfigError(f"batch_size {batch_size}: automatic batch sizes are not supported; give a number")
        self.batch_size = _positive_int("batch_size", batch_size)
        if isinstance(path, LoadedModel):
            loaded, bundle = path, tokenizer
        else:
            loaded = load_model(path, ema=bool(ema))
            if tokenizer is None and loaded.tokenizer_dir is None:
                raise ConfigError(f"{path}: a HF directory needs model_args tokenizer=DIR")
            bundle = load_tokenizer_dir(tokenizer or loaded.tokenizer_dir)
        self.loaded, self.tokenizer = loaded, bundle
        # lm-eval's --device defaults to cuda:0; without CUDA the model stays on the CPU, as lm-eval's hf model does
        if device is not None and (torch.cuda.is_available() or not str(device).startswith("cuda")):
            loaded.model.to(device)
        self.model = loaded.model
        self._device = next(self.model.parameters()).device
        positions = self.model.config.max_position_embeddings
        self.max_length = positions if max_length is None else _positive_int("max_length", max_length)
        if not 2 <= self.max_length <= positions:
            raise ConfigError(f"model_args max_length={self.max_length}: expected 2 <= max_length <= {positions}")
        if speculative and not len(self.model.mtp):
            raise ConfigError(f"{loaded.description}: speculative=mtp needs a model with an MTP module")
        self.speculative = speculative == "mtp"

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """``<bos> string`` unless ``add_special_tokens`` is False."""
        prefix = [] if add_special_tokens is False else [self.tokenizer.bos_id]
        return prefix + self.tokenizer.encode(string)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.tokenizer.decode(ids, skip_special_tokens=True)

    def get_model_info(self) -> dict:
        return {"model": self.loaded.description, "tokenizer": str(self.tokenizer.directory),
                "tokenizer_fingerprint": self.tokenizer.fingerprint, "max_length": self.max_length}

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] of the main model (no MTP heads)."""
        model = self.model
        h = model.trunk(model.embed_tokens(ids), model.rope(ids.shape[1], ids.device))
        return model.lm_head(model.norm(h))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per (key, context ids,
        continuation ids); the input keeps the last ``max_length`` tokens, longest rows first."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood", file=sys.stderr)
        for chunk in collator.get_batched(n=self.batch_size):
            rows = []
            for _, context, continuation in chunk:
                if len(continuation) > self.max_length:
                    raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
                rows.append((context + continuation)[-(self.max_length + 1):-1])
            width = max(map(len, rows))
            padded = [row + [self.tokenizer.eos_id] * (width - len(row)) for row in rows]
            logits = self._logits(torch.tensor(padded, device=self.device))
            for (key, _, continuation), row, row_logits in zip(chunk, rows, logits):
                logprobs = row_logits[len(row) - len(continuation) : len(row)].float().log_softmax(-1)
                targets = torch.tensor(continuation, device=self.device)
                answer = (logprobs.gather(-1, targets[:, None]).double().sum().item(),
                          bool((logprobs.argmax(-1) == targets).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | <bos>) per request through disjoint windows of ``max_length`` tokens."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            ids = self.tok_encode(request.args[0], add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float,
                top_p: float) -> list[list[int]]:
        """New tokens of prompts of one length, decoded together through the MLA latent cache until
        each row meets EOS (dropped), a stop string or ``max_new`` tokens."""
        model, eos = self.model, self.tokenizer.eos_id
        cache = LatentCache(len(model.layers))
        outputs, done = [[] for _ in prompts], [False] * len(prompts)
        step = torch.tensor(prompts, device=self.device)
        while not all(done):
            h = model.trunk(model.embed_tokens(step), model.rope(step.shape[1], self.device, cache.seq_len), cache=cache)
            picks = [pick_token(row, temperature, top_p, None) for row in model.lm_head(model.norm(h[:, -1]))]
            for row, token in enumerate(picks):
                if done[row] or token == eos:
                    done[row] = True
                    continue
                outputs[row].append(token)
                done[row] = len(outputs[row]) == max_new or any(stop in self._text(outputs[row]) for stop in until)
            step = torch.tensor(picks, device=self.device)[:, None]
        return outputs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut before the first stop string (``until`` plus EOS); greedy unless
        ``do_sample`` (``temperature``, ``top_p``)."""
        jobs = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
            max_new, temperature = kwargs.pop("max_gen_toks"), float(kwargs.pop("temperature", 0.0))
            top_p, sample = float(kwargs.pop("top_p", 1.0)), kwargs.pop("do_sample")
            if kwargs:
                raise ConfigError(f"generation_kwargs: {', '.join(sorted(kwargs))} not supported "
                                  "(until, max_gen_toks, do_sample, temperature, top_p)")
            if not 0 < max_new < self.max_length:
                raise ConfigError(f"max_gen_toks {max_new}: expected 1 <= max_gen_toks < max_length {self.max_length}")
            if self.speculative and sample:
                raise ConfigError("speculative=mtp decodes greedily: the task asks for do_sample")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            jobs.append(((len(prompt), max_new, tuple(until), temperature if sample else 0.0, top_p), prompt, index))
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", file=sys.stderr)
        for key, group in groupby(sorted(jobs, key=lambda job: job[0]), key=lambda job: job[0]):
            _, max_new, until, temperature, top_p = key
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if self.speculative:
                    decoded = [generate_speculative(self.model, prompt, max_new, self.tokenizer.eos_id).tokens
                               for _, prompt, _ in batch]
                    decoded = [tokens[:-1] if tokens[-1] == self.tokenizer.eos_id else tokens for tokens in decoded]
                else:
                    decoded = self._decode([prompt for _, prompt, _ in batch], max_new, list(until), temperature, top_p)
                for (_, _, index), tokens in zip(batch, decoded):
                    results[index] = postprocess_generated_text(self._text(tokens), list(until), None)
                    self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
                bar.update(len(batch))
        bar.close()
        return results


def evaluate_tasks(loaded: LoadedModel, tokenizer: TokenizerBundle, tasks: list[str], include_path: str | None = None,
                   num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 1,
                   max_length: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of the loaded model on ``tasks`` (lm-eval's and ``include_path``'s
    YAMLs; lm-eval's ~14k built-in ones are indexed only when a task is not in ``include_path``):
    the harness's results as JSON-ready data."""
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(not manager.match_tasks([task]) for task in tasks):
        manager = TaskManager(include_path=include_path)
    missing = [task for task in tasks if not manager.match_tasks([task])]
    if missing:
        raise ConfigError(f"--tasks: unknown {', '.join(missing)} (see `lm-eval ls tasks`; local YAMLs need --include-path)")
    model = DeepSeekPretrainLM(loaded, tokenizer, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False)
    return json.loads(json.dumps(results, default=handle_non_serializable))
