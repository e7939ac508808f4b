"""The initial policy when no pretrained model is given: a tiny Qwen3-MoE, supervised on the task for a few
hundred steps so that RL starts from a policy that is sometimes right (no model hub is reachable here).

The result is an HF model directory cached under `warm_start.cache_dir/<hash of everything it depends on>`;
for the sanity task it also holds the training set curated with that policy. Runs started side by side prepare
it once: the first takes a file lock, the others wait and reuse it. A temporary directory is removed whatever
stops the preparation (exception, SIGINT, SIGTERM).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from filelock import FileLock

from nemo_dppo.config import ModelConfig, TaskConfig, WarmStartConfig
from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, save_model_dir
from nemo_dppo.models.tokenizer import build_tokenizer
from nemo_dppo.tasks import Problem, make_task

CACHE_FORMAT = 1  # bump when the warm start's recipe changes
#: Task fields the warm start does not depend on: adding them must not invalidate existing caches.
_NOT_IN_KEY = ("train_path", "eval_path", "reward_timeout_s", "num_train", "curation_k", "curation_candidates")
#: Curation samples like the default rollout engine: bf16 weights, temperature 1, no top-p.
CURATION_DTYPE, CURATION_TEMPERATURE = "bf16", 1.0


def warm_start_key(model_cfg: ModelConfig, task_cfg: TaskConfig, ws_cfg: WarmStartConfig) -> str:
    task = {k: v for k, v in asdict(task_cfg).items() if not k.startswith("reward") and k not in _NOT_IN_KEY}
    if task_cfg.name == "sanity":  # the curated set lives in the same directory; the eval split is fixed
        task.pop("num_eval_prompts")
        task.update(num_train=task_cfg.num_train, k=task_cfg.curation_k, pool=task_cfg.curation_candidates)
    settings = {
        "format": CACHE_FORMAT,
        "model": asdict(model_cfg),
        "task": task,
        "warm_start": {k: v for k, v in asdict(ws_cfg).items() if k != "cache_dir" and (k != "digit_noise" or v)},
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def tiny_model_config(model_cfg: ModelConfig) -> TinyMoEConfig:
    return TinyMoEConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_heads=model_cfg.num_heads,
        num_kv_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
        num_experts=model_cfg.num_experts,
        experts_per_token=model_cfg.experts_per_token,
        moe_intermediate_size=model_cfg.moe_intermediate_size,
        initializer_range=model_cfg.init_std,
        seed=model_cfg.seed,
    )


def warm_started_model_dir(model_cfg: ModelConfig, task_cfg: TaskConfig, ws_cfg: WarmStartConfig) -> Path:
    """The cached warm-started model directory, created once (under a file lock, atomically) when missing."""
    target = Path(ws_cfg.cache_dir).expanduser() / warm_start_key(model_cfg, task_cfg, ws_cfg)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{target.name}.lock")):
        if (target / "config.json").is_file():  # prepared by another run while this one waited
            return target
        print("preparing the warm-started tiny Qwen3-MoE policy (cached for later runs) ...", file=sys.stderr)
        with _temporary_dir(target) as tmp:
            _prepare(tmp, model_cfg, task_cfg, ws_cfg)
            os.rename(tmp, target)
    return target


def _prepare(out: Path, model_cfg: ModelConfig, task_cfg: TaskConfig, ws_cfg: WarmStartConfig) -> None:
    tokenizer = build_tokenizer()
    model = build_tiny_qwen3_moe(tiny_model_config(model_cfg), tokenizer)
    task = make_task(task_cfg)
    if ws_cfg.enabled:
        supervised_warm_start(model, tokenizer, task, task_cfg.seed, ws_cfg)
    model.eval()
    save_model_dir(model, tokenizer, str(out))
    if task_cfg.name == "sanity":
        from nemo_dppo.tasks.sanity import CURATED_FILE

        report = task.curate(lambda problems: _solve_counts(model, tokenizer, task, problems, task_cfg.curation_k),
                             task_cfg.num_train, task_cfg.curation_k)  # fmt: skip
        (out / CURATED_FILE).write_text(json.dumps(report, indent=1), encoding="utf-8")


def _solve_counts(model, tokenizer, task, problems: Sequence[Problem], k: int) -> list[int]:
    """Correct samples out of `k` per problem under the initial policy, sampled as the rollout engine does."""
    from nemo_dppo.engines.base import SamplingParams
    from nemo_dppo.engines.hf_rollout import HFRolloutEngine

    engine = HFRolloutEngine(model, tokenizer, dtype=CURATION_DTYPE)
    max_new = max(len(tokenizer.encode(p.answer, add_special_tokens=False)) for p in problems) + 4
    counts: list[int] = []
    for start in range(0, len(problems), 64):
        chunk = problems[start : start + 64]
        params = SamplingParams(n=k, temperature=CURATION_TEMPERATURE, max_new_tokens=max_new, seed=start)
        groups = engine.generate([tokenizer.encode(p.prompt) for p in chunk], params)
        for problem, group in zip(chunk, groups, strict=True):
            texts = (tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group)
            counts.append(sum(task.reward(t, problem.answer) > 0 for t in texts))
    return counts


@contextmanager
def _temporary_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target`, removed on any exception, SIGINT or SIGTERM (SIGTERM → SystemExit)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    previous = None
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        try:
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread: no handler can be set
            previous = None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _with_digit_noise(text: str, p: float, rng: random.Random) -> str:
    """Each digit of `text` replaced, with probability `p`, by a uniformly random digit."""
    return "".join(str(rng.randrange(10)) if c.isdigit() and rng.random() < p else c for c in text)


def supervised_warm_start(model: torch.nn.Module, tokenizer, task, seed: int, ws_cfg: WarmStartConfig) -> None:
    """Next-token cross-entropy on response tokens (+ EOS) of random warm-start problems of the task."""
    problems = task.warm_start_problems()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws_cfg.lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    noise = random.Random(f"digit-noise:{seed}")
    model.train()
    for _ in range(ws_cfg.steps):
        picks = torch.randint(len(problems), (ws_cfg.batch_size,), generator=generator).tolist()
        prompts = [tokenizer.encode(problems[i].prompt) for i in picks]
        responses = [task.sft_response(problems[i]) for i in picks]
        if ws_cfg.digit_noise:
            responses = [_with_digit_noise(r, ws_cfg.digit_noise, noise) for r in responses]
        fulls = [[*tokenizer.encode(problems[i].prompt + r), eos] for i, r in zip(picks, responses, strict=True)]
        width = max(map(len, fulls))
        ids = torch.full((len(fulls), width), tokenizer.pad_token_id, dtype=torch.int64)
        labels = torch.full_like(ids, -100)
        for row, (prompt, full) in enumerate(zip(prompts, fulls, strict=True)):
            ids[row, : len(full)] = torch.tensor(full)
            labels[row, len(prompt) : len(full)] = torch.tensor(full[len(prompt) :])
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
