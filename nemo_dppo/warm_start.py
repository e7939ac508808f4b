"""The initial policy when no pretrained model is given: a tiny Qwen3-MoE, supervised on the task for a few
hundred steps so that RL starts from a policy that is sometimes right (no model hub is reachable here).

The result is an HF model directory cached under `warm_start.cache_dir/<hash of everything it depends on>`, so a
second run with the same settings skips the warm start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from nemo_dppo.config import ModelConfig, TaskConfig, WarmStartConfig
from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, save_model_dir
from nemo_dppo.models.tokenizer import build_tokenizer
from nemo_dppo.tasks.arithmetic import ArithmeticTask, sft_example

CACHE_FORMAT = 1  # bump when the warm start's recipe changes
#: Task fields the (arithmetic) warm start does not depend on: adding them must not invalidate existing caches.
_NOT_IN_KEY = ("train_path", "eval_path", "reward_timeout_s")


def warm_start_key(model_cfg: ModelConfig, task_cfg: TaskConfig, ws_cfg: WarmStartConfig) -> str:
    settings = {
        "format": CACHE_FORMAT,
        "model": asdict(model_cfg),
        "task": {k: v for k, v in asdict(task_cfg).items() if not k.startswith("reward") and k not in _NOT_IN_KEY},
        "warm_start": {k: v for k, v in asdict(ws_cfg).items() if k != "cache_dir"},
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
    """The cached warm-started model directory, created (atomically) when missing."""
    target = Path(ws_cfg.cache_dir).expanduser() / warm_start_key(model_cfg, task_cfg, ws_cfg)
    if (target / "config.json").is_file():
        return target
    print("preparing the warm-started tiny Qwen3-MoE policy (cached for later runs) ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_tiny_qwen3_moe(tiny_model_config(model_cfg), tokenizer)
        if ws_cfg.enabled:
            supervised_warm_start(model, tokenizer, task_cfg, ws_cfg)
        save_model_dir(model.eval(), tokenizer, str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def supervised_warm_start(model: torch.nn.Module, tokenizer, task_cfg: TaskConfig, ws_cfg: WarmStartConfig) -> None:
    """Next-token cross-entropy on answer tokens (+ EOS) of random train problems."""
    task = ArithmeticTask(num_digits=task_cfg.num_digits, ops=task_cfg.ops, seed=task_cfg.seed)
    problems = task.all_problems("train")
    generator = torch.Generator().manual_seed(task_cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws_cfg.lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    model.train()
    for _ in range(ws_cfg.steps):
        picks = torch.randint(len(problems), (ws_cfg.batch_size,), generator=generator).tolist()
        prompts = [tokenizer.encode(problems[i].prompt) for i in picks]
        fulls = [[*tokenizer.encode(sft_example(problems[i].prompt, problems[i].answer)), eos] for i in picks]
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
