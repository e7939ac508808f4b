"""The NeMo-RL recipes under conf/nemo_rl/ and their validator (`nemo_dppo.nemo_rl.recipes.recipe_validator`).

Every recipe must validate, for every loss mode; the paper's settings must be what the Qwen3-30B-A3B-Base recipe
says; deliberately broken configs must fail with one line naming the key. Loading goes through the same
`defaults:` + Hydra-override semantics as NeMo-RL's `nemo_rl.utils.config` (reproduced in `recipe_loading`).
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nemo_dppo.losses import LOSS_MODES
from nemo_dppo.nemo_rl.recipes.architectures import ARCHITECTURES
from nemo_dppo.nemo_rl.recipes.recipe_loading import RecipeLoadError, load_recipe, to_plain
from nemo_dppo.nemo_rl.recipes.recipe_validator import RecipeError, validate_file, validate_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO / "conf" / "nemo_rl"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
BASE = RECIPE_DIR / "qwen3_30b_a3b_base.yaml"
R1_DISTILL = RECIPE_DIR / "deepseek_r1_distill_qwen_1_5b_sanity.yaml"


@functools.cache
def _loaded(path: Path) -> dict[str, Any]:
    return to_plain(load_recipe(path))


def loaded(path: Path) -> dict[str, Any]:
    """A fresh copy of the resolved recipe (loading once per file: OmegaConf takes ~0.3 s per recipe)."""
    return copy.deepcopy(_loaded(path))


def setting(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return config


def test_the_expected_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {
        "qwen3_30b_a3b_base",
        "qwen3_30b_a3b_base_r3",
        "qwen3_30b_a3b_base_fp16",
        "qwen3_30b_a3b_base_lora",
        "qwen3_30b_a3b_thinking",
        "qwen3_8b_base",
        "qwen3_1_7b_base_relax",
        "deepseek_r1_distill_qwen_1_5b_sanity",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_for_every_loss_mode(path: Path) -> None:
    config = loaded(path)
    summary = validate_recipe(config)
    assert summary.model in ARCHITECTURES
    for mode in sorted(LOSS_MODES):
        assert validate_recipe(setting(loaded(path), "loss_fn.mode", mode)).mode == mode


def test_base_recipe_holds_the_papers_settings() -> None:
    c = loaded(BASE)
    summary = validate_recipe(c)
    m, g, v = c["policy"]["megatron_cfg"], c["policy"]["generation"], c["policy"]["generation"]["vllm_cfg"]
    assert c["policy"]["model_name"] == "Qwen/Qwen3-30B-A3B-Base"
    assert (c["cluster"]["num_nodes"], c["cluster"]["gpus_per_node"], summary.world_size) == (2, 8, 16)
    parallel = ("tensor_model", "expert_model", "expert_tensor", "pipeline_model", "context")
    assert [m[f"{k}_parallel_size"] for k in parallel] == [2, 8, 1, 1, 1]
    assert (v["tensor_parallel_size"], v["gpu_memory_utilization"]) == (4, 0.7)
    assert (m["optimizer"]["lr"], m["optimizer"]["min_lr"], m["optimizer"]["weight_decay"]) == (1e-6, 1e-6, 0.01)
    assert m["scheduler"]["lr_decay_style"] == "constant" and c["policy"]["max_grad_norm"] == 1.0
    assert (c["grpo"]["num_prompts_per_step"], c["grpo"]["num_generations_per_prompt"]) == (256, 16)
    assert (summary.mini_batches, summary.global_batch) == (8, 512)
    assert (c["data"]["max_input_seq_length"], g["max_new_tokens"]) == (2048, 8192)
    assert (g["temperature"], g["top_p"], g["top_k"]) == (1.0, 1.0, None)
    # Dr.GRPO: mean baseline, no std normalisation, on ±1 rewards; no KL; C off; δ from the mode (0.15 / 0.05)
    assert not c["grpo"]["normalize_rewards"] and not c["grpo"]["use_leave_one_out_baseline"]
    assert (c["grpo"]["reward_scaling"]["target_min"], c["grpo"]["reward_scaling"]["target_max"]) == (-1.0, 1.0)
    assert c["loss_fn"]["reference_policy_kl_penalty"] == 0.0 and c["loss_fn"]["ratio_cap"] == 1e4
    assert c["loss_fn"]["mode"] == "dppo_binary_tv" and c["loss_fn"]["delta_low"] is None
    assert c["grpo"]["max_num_steps"] == 500 and not summary.router_replay


def test_variants_change_only_what_they_name() -> None:
    base = loaded(BASE)
    r3, fp16, lora = (loaded(RECIPE_DIR / f"qwen3_30b_a3b_base_{v}.yaml") for v in ("r3", "fp16", "lora"))
    assert validate_recipe(r3).router_replay and r3["policy"]["router_replay"] == {"enabled": True}
    assert (
        fp16["policy"]["precision"] == "float16" and fp16["policy"]["generation"]["vllm_cfg"]["precision"] == "float16"
    )
    assert lora["policy"]["megatron_cfg"]["peft"]["enabled"]
    for variant in (r3, fp16, lora):
        assert variant["grpo"] == base["grpo"] and variant["loss_fn"] == base["loss_fn"]
    thinking = loaded(RECIPE_DIR / "qwen3_30b_a3b_thinking.yaml")
    assert thinking["policy"]["tokenizer"]["chat_template_kwargs"] == {"enable_thinking": True}
    relax = loaded(RECIPE_DIR / "qwen3_1_7b_base_relax.yaml")["loss_fn"]
    assert (relax["mode"], relax["relax"], relax["relax_prob_threshold"]) == ("ppo_clip", "both", 0.1)


BROKEN: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("unknown key", lambda: setting(loaded(BASE), "loss_fn.modee", "x"), "did you mean 'mode'?"),
    (
        "misnamed parallel key",
        lambda: setting(loaded(BASE), "policy.megatron_cfg.tensor_parallel_size", 2),
        "did you mean 'tensor_model_parallel_size'?",
    ),
    ("unknown section", lambda: setting(loaded(BASE), "polcy.x", 1), "valid keys in the top level"),
    ("bad mode", lambda: setting(loaded(BASE), "loss_fn.mode", "dppo_tvv"), "valid modes:"),
    (
        "TP vs heads",
        lambda: setting(loaded(BASE), "policy.megatron_cfg.tensor_model_parallel_size", 3),
        "must divide the model's 32 attention heads and 4 KV heads",
    ),
    (
        "TP vs KV heads",
        lambda: setting(loaded(R1_DISTILL), "policy.megatron_cfg.tensor_model_parallel_size", 4),
        "12 attention heads and 2 KV heads",
    ),
    (
        "EP vs experts",
        lambda: setting(loaded(BASE), "policy.megatron_cfg.expert_model_parallel_size", 6),
        "must divide the model's 128 experts",
    ),
    (
        "EP on a dense model",
        lambda: setting(loaded(RECIPE_DIR / "qwen3_8b_base.yaml"), "policy.megatron_cfg.expert_model_parallel_size", 2),
        "must be 1: the model is dense",
    ),
    ("world vs EP", lambda: setting(loaded(BASE), "cluster.gpus_per_node", 6), "12 is not a multiple of EP·ETP·PP"),
    (
        "world vs TP·PP·CP",
        lambda: setting(setting(loaded(BASE), "cluster.gpus_per_node", 3), "cluster.num_nodes", 1),
        "3 is not a multiple of TP·PP·CP",
    ),
    (
        "TP ≥ 4 micro-batches",
        lambda: setting(
            setting(
                setting(loaded(BASE), "policy.megatron_cfg.tensor_model_parallel_size", 4),
                "policy.logprob_batch_size",
                2,
            ),
            "policy.make_sequence_length_divisible_by",
            4,
        ),
        "needs policy.logprob_batch_size == train_micro_batch_size",
    ),
    (
        "sequence length vs SP",
        lambda: setting(loaded(BASE), "policy.make_sequence_length_divisible_by", 3),
        "must be a multiple of TP for sequence parallelism = 2",
    ),
    (
        "MoE needs SP",
        lambda: setting(loaded(BASE), "policy.megatron_cfg.sequence_parallel", False),
        "sequence_parallel must be true",
    ),
    (
        "vLLM TP",
        lambda: setting(loaded(BASE), "policy.generation.vllm_cfg.tensor_parallel_size", 3),
        "tensor_parallel_size=3 must divide the model's 32 attention heads",
    ),
    (
        "mini-batches",
        lambda: setting(loaded(BASE), "grpo.num_prompts_per_step", 100),
        "1600 samples per step is not a multiple of policy.train_global_batch_size=512",
    ),
    (
        "micro-batches",
        lambda: setting(loaded(BASE), "policy.train_micro_batch_size", 128),
        "not a multiple of DP × train_micro_batch_size = 8 × 128",
    ),
    (
        "lengths",
        lambda: setting(loaded(BASE), "policy.generation.max_new_tokens", 9000),
        "exceeds policy.max_total_sequence_length=10240",
    ),
    ("KL penalty", lambda: setting(loaded(BASE), "loss_fn.reference_policy_kl_penalty", 0.01), "set it to 0"),
    (
        "R3 on a dense model",
        lambda: setting(loaded(RECIPE_DIR / "qwen3_8b_base.yaml"), "policy.router_replay.enabled", True),
        "needs an MoE model",
    ),
    (
        "Top-K with top-p",
        lambda: setting(setting(loaded(BASE), "loss_fn.mode", "dppo_topk_tv"), "policy.generation.top_p", 0.9),
        "needs policy.generation.top_p=1.0",
    ),
    (
        "Top-K above vLLM's max_logprobs",
        lambda: setting(setting(loaded(BASE), "loss_fn.mode", "dppo_topk_kl"), "loss_fn.topk", 32),
        "exceeds vLLM's max_logprobs=20",
    ),
    (
        "precision vs optimiser",
        lambda: setting(loaded(BASE), "policy.precision", "float16"),
        "bf16=True disagrees with policy.precision=float16",
    ),
    ("unknown model", lambda: setting(loaded(BASE), "policy.model_name", "Qwen/Qwen3-30B-A3B-Bse"), "add its head"),
    ("async GRPO", lambda: setting(loaded(BASE), "grpo.async_grpo.enabled", True), "synchronous grpo_train"),
]


@pytest.mark.parametrize(("name", "make", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_configs_fail_with_one_clear_line(name: str, make: Callable[[], dict[str, Any]], message: str) -> None:
    with pytest.raises(RecipeError) as error:
        validate_recipe(make())
    text = str(error.value)
    assert message in text, text
    assert "\n" not in text


def test_overrides_use_nemo_rls_hydra_grammar() -> None:
    summary = validate_file(BASE, ["loss_fn.mode=dppo_topk_tv", "loss_fn.topk=8", "grpo.max_num_steps=3"])
    assert (summary.mode, summary.topk) == ("dppo_topk_tv", 8)
    alias = validate_file(BASE, ["+loss_fn.loss_mode=dppo_tv"])  # NeMo-RL PR #4069's key, verl's name
    assert alias.mode == "dppo_binary_tv"
    with pytest.raises(RecipeError, match="name different losses"):
        validate_file(BASE, ["+loss_fn.loss_mode=ppo_recompute"])
    with pytest.raises(RecipeLoadError, match=r"did you mean 'mode'\?"):
        validate_file(BASE, ["loss_fn.modee=dppo_binary_kl"])
    with pytest.raises(RecipeLoadError, match=r"add it with \+loss_fn\.clip_low=0\.3"):
        validate_file(BASE, ["loss_fn.clip_low=0.3"])  # valid key, absent from the recipe: NeMo-RL needs `+`
    with pytest.raises(RecipeError, match="both set clip_low"):
        validate_file(BASE, ["+loss_fn.clip_low=0.3"])  # ratio_clip_min already sets it


def test_defaults_inheritance_like_nemo_rl(tmp_path: Path) -> None:
    """`defaults:` relative to the file, parents merged in order, `_override_: true` replaces a section."""
    (tmp_path / "a.yaml").write_text("x: {p: 1, q: 1}\ny: {k: 1}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("defaults: ../a.yaml\nx: {q: 2}\n")
    (tmp_path / "c.yaml").write_text("defaults: [sub/b.yaml]\ny: {_override_: true, z: 3}\n")
    assert to_plain(load_recipe(tmp_path / "c.yaml")) == {"x": {"p": 1, "q": 2}, "y": {"z": 3}}
    (tmp_path / "loop.yaml").write_text("defaults: loop.yaml\n")
    with pytest.raises(RecipeLoadError, match="cycle"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("x: [1\n")
    with pytest.raises(RecipeLoadError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_validate_cli(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"defaults: {BASE}\npolicy:\n  megatron_cfg:\n    expert_model_parallel_size: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "nemo_dppo.nemo_rl.validate", *map(str, RECIPES), str(broken)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    ok_lines = result.stdout.strip().splitlines()
    assert len(ok_lines) == len(RECIPES) and all(line.startswith("ok ") for line in ok_lines)
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"error: {broken}: policy.megatron_cfg.expert_model_parallel_size=5 must divide the model's 128 experts"
    ]
