"""Time and peak memory of log π (+ Top-K) from logits: ours (vocab_parallel_logprobs) against the naive way.

    python tools/bench_topk.py [--tokens 2048] [--vocab 151936] [--topk 20] [--dtype fp32|bf16]
                               [--chunk-tokens 512] [--repeats 5]

Single process, CPU, one [tokens, vocab] logits tensor (fp32 by default — what an fp32 LM head hands to the loss;
`--dtype bf16` for a bf16 head). Every variant runs forward + backward of the sampled-token term:

- (a)  ours, sampled-token log π only                  `vocab_parallel_logprobs(logits, ids)`
- (b)  ours, + π at the K rollout ids                   `..., topk_ids=topk`
- (b') (b) with `grad_in_logits=True`                   the gradient overwrites the logits' storage (Megatron-style)
- (c)  naive: full fp32 `log_softmax`, gather the sampled id and the K ids, backward of the sampled term
- (d)  `nemo_dppo.logprobs.gather_logprobs` + Top-K     the current single-process trainer path, same chunking

Time: `--repeats` interleaved rounds (one warm-up round dropped) in this process; "time × (a)" is the median over
rounds of each round's ratio to (a), which cancels most of the load that other processes put on the machine.

Peak memory: each variant runs in a fresh subprocess (`--_measure`). It runs the variant on 64 tokens to warm up
(thread pools, lazy initialisation), builds the inputs (the logits row block by row block, so that building them
leaves no high-water mark above the logits), then resets the kernel's peak-RSS counter (writes "5" to
/proc/self/clear_refs, Linux ≥ 4.0), reads VmRSS as the baseline (interpreter + torch + the logits + ids) and runs
the variant once: "extra" = VmHWM − baseline, the real high-water mark of the process over the logits,
whatever allocated it (torch's CPU allocator hands blocks this large to glibc, which mmaps and unmaps them, so
freed memory does not stay resident). If clear_refs is not writable the warm-up is skipped and VmHWM is read as is
(still valid: the inputs are built without temporaries larger than the logits). A second column counts tensor
storages only (`nemo_dppo.distributed.memory.TensorMemoryMeter`, a TorchDispatchMode: exact, but blind to kernel
workspaces), recorded during the same run; the two agree when no kernel allocates behind torch's back.

Targets: (b) time ≤ 1.2 × (a); (c)'s extra peak memory ≥ 3 × (b)'s. The gradient w.r.t. the logits is the size of
the logits and every variant but (b') allocates it, so an out-of-place gradient alone is 1/3 of the naive extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nemo_dppo.distributed.memory import TensorMemoryMeter
from nemo_dppo.distributed.vocab_parallel import vocab_parallel_logprobs
from nemo_dppo.logprobs import gather_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits [N, V] leaf requiring grad, ids [N], topk [N, K]


def make_logits(args: argparse.Namespace) -> torch.Tensor:
    """[tokens, vocab] logits filled 256 rows at a time (no full-size temporary, e.g. an fp32 copy before bf16)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(args.tokens, args.vocab, dtype=DTYPES[args.dtype])
    for start in range(0, args.tokens, 256):
        block = logits[start : start + 256]
        block.copy_(torch.randn(block.shape, generator=g) * 2)
    return logits.requires_grad_(True)


def make_ids(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    topk = torch.randint(0, args.vocab, (args.tokens, args.topk), generator=g)
    return topk[:, 0].clone(), topk  # the sampled token is among the K (rollout's Top-K contains a_t)


def run_ours(topk: bool, grad_in_logits: bool = False) -> Callable[[Inputs, argparse.Namespace], None]:
    def run(inputs: Inputs, args: argparse.Namespace) -> None:
        logits, ids, topk_ids = inputs
        out = vocab_parallel_logprobs(
            logits,
            ids,
            topk_ids=topk_ids if topk else None,
            temperature=args.temperature,
            chunk_tokens=args.chunk_tokens,
            grad_in_logits=grad_in_logits,
        )
        out.logprobs.sum().backward()

    return run


def run_naive(inputs: Inputs, args: argparse.Namespace) -> None:
    logits, ids, topk_ids = inputs
    scaled = logits.float() if args.temperature == 1.0 else logits.float() / args.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    picked = logp.gather(-1, ids[:, None]).squeeze(-1)
    with torch.no_grad():
        logp.gather(-1, topk_ids)
    picked.sum().backward()


def run_gather_logprobs(inputs: Inputs, args: argparse.Namespace) -> None:
    logits, ids, topk_ids = inputs
    out = gather_logprobs(logits, ids, topk_ids=topk_ids, temperature=args.temperature, chunk_tokens=args.chunk_tokens)
    out.logprobs.sum().backward()


VARIANTS: dict[str, tuple[str, Callable[[Inputs, argparse.Namespace], None]]] = {
    "a": ("ours: sampled-token log π", run_ours(topk=False)),
    "b": ("ours: + Top-K", run_ours(topk=True)),
    "b'": ("ours: + Top-K, grad_in_logits", run_ours(topk=True, grad_in_logits=True)),
    "c": ("naive: fp32 log_softmax + gather", run_naive),
    "d": ("logprobs.gather_logprobs + Top-K", run_gather_logprobs),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: extra peak RSS and extra peak tensor bytes of one fwd+bwd over the logits (see above)."""
    run = VARIANTS[variant][1]
    with TensorMemoryMeter():  # its first use imports ~900 modules (~150 MiB): before the baseline, not in "extra"
        torch.ones(1).add(1)
    can_reset = _reset_peak_rss()
    if can_reset:  # warm-up on a few tokens: thread pools, lazy initialisation, code pages
        small = argparse.Namespace(**{**vars(args), "tokens": min(args.tokens, 64)})
        run((make_logits(small), *make_ids(small)), small)
    inputs = (make_logits(args), *make_ids(args))
    if can_reset:
        _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    with TensorMemoryMeter() as meter:  # its bookkeeping is a few small Python objects per op
        run(inputs, args)
    rss_extra = (_status_kib("VmHWM") - baseline) * 1024
    return {"rss_extra": rss_extra, "tensor_extra": meter.peak, "rss_reset": can_reset}


def time_variants(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of one fwd+bwd per variant and round; variants interleaved per round so machine noise hits all alike."""
    base = make_logits(args).detach()
    ids, topk = make_ids(args)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.repeats + 1):
        for variant, (_, run) in VARIANTS.items():
            logits = base.clone().requires_grad_(True)  # fresh: (b') overwrites its logits with the gradient
            start = time.perf_counter()
            run((logits, ids, topk), args)
            if round_:  # round 0 warms up
                times[variant].append(time.perf_counter() - start)
            del logits
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936, help="Qwen3's padded vocabulary")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits dtype (math is fp32)")
    parser.add_argument(
        "--chunk-tokens", type=int, default=512, help="tokens per chunk (512 × 151,936 × 4 B = 297 MiB per buffer)"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--_measure", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._measure:
        print(json.dumps(measure_memory(args._measure, args)))
        return

    forwarded = [a for a in sys.argv[1:] if not a.startswith("--_measure")]
    memory = {}
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--_measure", variant], capture_output=True, text=True, check=True
        )
        memory[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    times = time_variants(args)
    seconds = {v: statistics.median(t) for v, t in times.items()}
    # Ratios to (a) per round (adjacent runs share the machine's load at that moment), then their median.
    ratio = {v: statistics.median(x / a for x, a in zip(t, times["a"], strict=True)) for v, t in times.items()}

    logits_mib = args.tokens * args.vocab * DTYPES[args.dtype].itemsize / MIB
    table = Table(
        title=f"log π fwd+bwd: {args.tokens} tokens × V={args.vocab:,} {args.dtype} logits ({logits_mib:,.0f} MiB), "
        f"K={args.topk}, chunk {args.chunk_tokens}, T={args.temperature}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    for name, justify in [("", "left"), ("variant", "left"), ("median ms", "right"), ("min ms", "right")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("time × (a)", justify="right")
    for name in ("extra peak RSS MiB", "× (a)", "extra tensors MiB", "(c) / this"):
        table.add_column(name, justify="right")
    for variant, (label, _) in VARIANTS.items():
        extra = memory[variant]["rss_extra"]
        table.add_row(
            variant,
            label,
            f"{seconds[variant] * 1e3:,.0f}",
            f"{min(times[variant]) * 1e3:,.0f}",
            f"{ratio[variant]:.2f}",
            f"{extra / MIB:,.0f}",
            f"{extra / memory['a']['rss_extra']:.2f}",
            f"{memory[variant]['tensor_extra'] / MIB:,.0f}",
            f"{memory['c']['rss_extra'] / extra:.2f}",
        )
    console = Console(width=160)
    console.print(table)
    if not all(m["rss_reset"] for m in memory.values()):
        console.print("note: /proc/self/clear_refs not writable; peak RSS read without reset (no warm-up run)")

    def verdict(ok: bool) -> str:
        return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

    console.print(
        f"time   (b) / (a) = {ratio['b']:.2f}  (median of per-round ratios; target ≤ 1.2)  {verdict(ratio['b'] <= 1.2)}"
    )
    for variant in ("b", "b'"):
        ratio = memory["c"]["rss_extra"] / memory[variant]["rss_extra"]
        console.print(
            f"memory (c) / ({variant}) extra peak = {ratio:.2f}  (target ≥ 3)  {verdict(ratio >= 3)}"
            + ("  (includes (b)'s own gradient, tokens × vocab)" if variant == "b" else "")
        )


if __name__ == "__main__":
    main()
