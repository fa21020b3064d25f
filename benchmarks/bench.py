"""Measure prefopt's real training step: tokens/s, where the step's time goes,
model FLOPs utilisation, memory. Optionally against Hugging Face TRL.

    python benchmarks/bench.py                                   # tiny Llama, DPO, AdamW, 8 pairs x ~125 tokens
    python benchmarks/bench.py loss.precompute_reference=true compile=true
    python benchmarks/bench.py loss.precompute_reference=true   # twice: the second run reads the reference cache
    python benchmarks/bench.py model=smollm2-135m batch_size=4 --steps 5
    python benchmarks/bench.py model=llama-25m          # a ~25M-parameter Llama (config/model/llama-25m.yaml)
    python benchmarks/bench.py --vs-trl                          # TRL's DPOTrainer and ours, back to back
    python benchmarks/bench.py --variant share_prompt=false --variant ''   # settings of ours, interleaved

Positional arguments are Hydra overrides of config/config.yaml (the same
names as train.py); the bench's own defaults (BENCH_OVERRIDES) come first, so
anything given on the command line wins. The step measured is
`BasicTrainer.train_step` itself, in a subclass that only adds timers.

What is measured:
  tokens/s   chosen+rejected non-pad tokens (prompt included) per second of
             wall time over the measured steps (warm-up steps excluded).
  split      per step: data (collate), forward (policy forward + loss),
             reference (reference forward; 0 when precomputed), optimizer
             (clip + step), backward (the rest of the step).
  MFU        model FLOPs per second / a peak measured on the spot: a 4096^2
             fp32 matmul on CPU (bf16 on CUDA). Model FLOPs per sequence of
             n tokens: 6*P*n + 6*L*d*n^2 for the policy (forward+backward; P =
             weights of all matmuls incl. the LM head, L layers, d = heads x
             head_dim, causal attention), plus 2*P*n + 2*L*d*n^2 for a
             reference forward when it runs in the step. These are the FLOPs
             actually run: with share_prompt (the default) a pair is one row
             and its prompt is counted once (bench.row_work).
  memory     peak memory (GPU: max allocated; CPU: the process's peak RSS),
             exact parameter and optimizer-state bytes.
  noise      other processes' CPU use during the measurement (from
             /proc/stat minus this process), beside each figure.

The table goes to stdout, the full result to --out (JSON), and the last line
of stdout is one JSON object with the headline numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as `python benchmarks/bench.py` from anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# 8 pairs a step, sequences of 122-128 tokens with the byte tokenizer (a 60-63
# letter sorting prompt, an answer as long), no eval, no logging.
BENCH_OVERRIDES = [
    "wandb.mode=disabled", "loss=dpo", "optimizer=AdamW", "lr=1e-5", "batch_size=8",
    "dataset.min_len=60", "dataset.max_len=63", "dataset.n_train=512", "dataset.n_eval=8",
    "max_length=256", "max_prompt_length=128", "n_eval_examples=8", "n_eval_generations=0", "eval_batch_size=8",
]
MAX_WAIT = 0.0  # seconds to wait for a quiet machine before each measurement (--max-wait)


# ----------------------------------------------------------------------------
# Machine: peak FLOP/s and other processes' CPU use.

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_gflops(device: torch.device, n: int = 4096, reps: int = 8) -> tuple[float, str]:
    """Best of `reps` n x n matmuls: fp32 on CPU, bf16 on CUDA. main() measures
    it before and after the runs and keeps the higher: a busy machine can only
    lower it, and a low peak would inflate MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9, f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def wait_for_quiet(max_wait: float, threshold: float = 10.0) -> float:
    """Wait (up to max_wait seconds) until other processes use < threshold % of
    the machine over one second; returns the seconds waited. The measurement
    itself still records what others used while it ran."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        monitor = CpuMonitor()
        time.sleep(1.0)
        other = monitor.read()["other_cpu_pct"]
        if other is None or other < threshold:
            break
    return round(time.perf_counter() - t0, 1)


class CpuMonitor:
    """CPU use of this process and of everything else since `start()`, in % of
    the whole machine (100% = every core busy), from /proc (Linux)."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def start(self) -> None:
        try:
            self.busy0, self.total0 = self._machine()
            self.own0 = self._own()
        except OSError:
            self.busy0 = None

    def read(self) -> dict:
        if self.busy0 is None:
            return {"other_cpu_pct": None, "own_cpu_pct": None}
        busy, total = self._machine()
        own = self._own() - self.own0
        span = max(1, total - self.total0)
        return {"other_cpu_pct": round(100 * max(0, busy - self.busy0 - own) / span, 1),
                "own_cpu_pct": round(100 * own / span, 1)}


# ----------------------------------------------------------------------------
# Model FLOPs.

def model_dims(model: torch.nn.Module) -> dict:
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul,
            "layers": cfg.num_hidden_layers, "attn_dim": cfg.num_attention_heads * head_dim}


def row_work(prompt: int, responses: list[int], shared: bool) -> list[tuple[int, float]]:
    """(tokens, attention pairs) that the model actually processes for one
    pair: two rows of prompt + response, or with share_prompt one row whose
    second response attends to the prompt and itself only (the prompt is
    processed once). Causal attention over n tokens ~ n^2/2 (query, key) pairs."""
    if not shared:
        return [(prompt + r, (prompt + r) ** 2 / 2) for r in responses]
    first, second = responses
    return [(prompt + first + second, (prompt + first) ** 2 / 2 + second * prompt + second ** 2 / 2)]


def sequence_flops(dims: dict, work: list[tuple[int, float]], reference: bool) -> float:
    """Model FLOPs of the rows processed: 2*P FLOPs per token and 4*d per
    attention pair per layer in a forward pass, x3 with the backward."""
    p, layers, d = dims["matmul_params"], dims["layers"], dims["attn_dim"]
    passes = 6 + (2 if reference else 0)  # forward+backward of the policy (+ a reference forward)
    return float(sum(passes * p * n + 2 * passes * layers * d * pairs for n, pairs in work))


# ----------------------------------------------------------------------------
# Our trainer, with timers around its own methods.

def timed_trainer_class():
    from trainers import BasicTrainer

    class TimedTrainer(BasicTrainer):
        """BasicTrainer with timers; the step it runs is BasicTrainer.train_step."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reset_timers()

        def reset_timers(self) -> None:
            self.timers = defaultdict(float)
            self.lengths = []   # tokens of each chosen/rejected sequence (tokens/s)
            self.work = []      # (tokens, attention pairs) of each row run (FLOPs)

        def _timed(self, name, fn, *args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.timers[name] += time.perf_counter() - t0
            return out

        def micro_batches(self, examples):
            out = self._timed("data", super().micro_batches, examples)
            for batch in out:
                self.lengths += batch["lengths"].tolist()
            for ex in examples:
                responses = [len(ex.chosen)] + ([len(ex.rejected)] if self.loss.two_sequences else [])
                self.work += row_work(len(ex.prompt), responses, self.share_prompt)
            return out

        def batch_metrics(self, batch, split):
            return self._timed("forward", super().batch_metrics, batch, split)

        def reference_logps(self, batch):
            return self._timed("reference", super().reference_logps, batch)

        def clip_grad_norm(self):
            return self._timed("optimizer", super().clip_grad_norm)

    return TimedTrainer


def compose(overrides: list[str]):
    from prefopt import optim as optimizers
    from prefopt.config_checks import compose as compose_config

    optimizers.register_configs()
    return compose_config(overrides)


def time_optimizer_step(trainer) -> None:
    state = {}

    def pre(*_):
        sync(trainer.device)
        state["t0"] = time.perf_counter()

    def post(*_):
        sync(trainer.device)
        trainer.timers["optimizer"] += time.perf_counter() - state["t0"]

    trainer.optimizer.register_step_pre_hook(pre)
    trainer.optimizer.register_step_post_hook(post)


def run_ours(overrides: list[str], steps: int, warmup: int, peak_gflops: float, label: str = "prefopt") -> dict:
    from prefopt.memory import optimizer_state_bytes, tensor_bytes

    cfg = compose(BENCH_OVERRIDES + overrides)
    with tempfile.TemporaryDirectory(prefix="prefopt-bench-") as run_dir:
        cfg.run_dir = run_dir
        trainer = timed_trainer_class()(cfg, run_dir)
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        time_optimizer_step(trainer)
        trainer.reset_timers()
        window = defaultdict(list)
        for _ in range(warmup):
            trainer.train_step(window)
        trainer.reset_timers()
        losses, step_times = [], []
        waited = wait_for_quiet(MAX_WAIT)
        monitor = CpuMonitor()
        start = time.perf_counter()
        for _ in range(steps):
            window = defaultdict(list)
            t = time.perf_counter()
            trainer.train_step(window)
            sync(trainer.device)
            step_times.append(time.perf_counter() - t)
            losses.append(float(window["loss/train"][0]))
        wall = time.perf_counter() - start
        noise = monitor.read()
        policy = trainer._unwrapped(trainer.policy)
        dims = model_dims(policy)
        in_step_reference = trainer.reference is not None
        flops = sequence_flops(dims, trainer.work, in_step_reference)
        split = {k: trainer.timers[k] / steps for k in ("data", "forward", "reference", "optimizer")}
        split["forward"] -= split["reference"]  # batch_metrics includes the reference forward
        split["backward"] = sum(step_times) / steps - sum(split.values())
        state_bytes, _ = optimizer_state_bytes(trainer.optimizer)
        peak_mem = (torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        trainer.cleanup()
    return {
        "label": label, "model": cfg.model.name, "loss": cfg.loss.name, "optimizer": cfg.optimizer.name,
        "batch_pairs": cfg.batch_size, "mean_seq_tokens": round(statistics.mean(trainer.lengths), 1),
        "device": str(trainer.device), "precision": cfg.precision, "threads": torch.get_num_threads(),
        "precompute_reference": bool(cfg.loss.get("precompute_reference", False)),
        "compile": bool(cfg.get("compile", False)), "share_prompt": trainer.share_prompt,
        "keep_cpu_memory": bool(cfg.get("keep_cpu_memory", False)) and trainer.device.type == "cpu",
        "params": dims["params"], "steps": steps, "warmup": warmup, "setup_s": round(setup_s, 2),
        "reference_cache": trainer.reference_cache_state,
        "tokens_per_s": sum(trainer.lengths) / wall,
        "step_s_median": statistics.median(step_times),
        "split_s": {k: round(v, 5) for k, v in split.items()},
        "model_gflops_per_s": flops / wall / 1e9, "mfu": flops / wall / 1e9 / peak_gflops,
        "reference_in_step": in_step_reference,
        "peak_memory_bytes": int(peak_mem), "params_bytes": tensor_bytes(policy.parameters()),
        "optimizer_state_bytes": state_bytes, "loss_first": losses[0], "loss_last": losses[-1], **noise,
        "waited_for_quiet_s": waited,
        "overrides": overrides,
    }


# ----------------------------------------------------------------------------
# TRL's DPOTrainer on the same model, data, batch and settings.

def run_trl(overrides: list[str], steps: int, warmup: int, peak_gflops: float, precompute: bool,
            compile: bool = False, keep_memory: bool = False) -> dict:
    """TRL's DPOTrainer, configured as fairly as we know: fp32 (its DPOConfig
    turns bf16 on by default), no gradient checkpointing (on by default), an
    explicit frozen reference model (a copy of the same initial weights), the
    same rows, batch, lr, beta, clipping, fused AdamW, no logging/eval/saving
    in the loop, no dataloader workers (2 cores). keep_memory: give TRL's
    process the malloc setting our trainer uses on CPU (keep_cpu_memory), to
    separate what the allocator buys from what the training step does."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preference_datasets import apply_chat_template, get_examples
    from prefopt.models import build_model, build_tokenizer
    from utils import set_seed

    datasets.disable_progress_bars()
    if keep_memory:
        from prefopt.memory import keep_cpu_memory
        keep_cpu_memory()
    cfg = compose(BENCH_OVERRIDES + overrides)
    set_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    policy = build_model(cfg.model, tokenizer)  # same seed, same init as ours
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rows = apply_chat_template(get_examples(cfg.dataset, "train"), tokenizer, cfg.dataset)
    dataset = datasets.Dataset.from_list([{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
                                          for r in rows])
    lengths, marks = [], []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            lengths.append(inputs["attention_mask"].sum(-1).tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="prefopt-bench-trl-") as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
            learning_rate=cfg.lr, lr_scheduler_type="constant", max_grad_norm=cfg.max_grad_norm, weight_decay=0.0,
            beta=cfg.loss.beta, loss_type=["sigmoid"], max_length=cfg.max_length,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
            precompute_ref_log_probs=precompute, max_steps=warmup + steps, logging_steps=10**6,
            save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
            seed=cfg.seed, disable_tqdm=True, torch_compile=compile,
        )
        t0 = time.perf_counter()
        trainer = Counting(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training print is all it would do
        setup_s = time.perf_counter() - t0
        waited = wait_for_quiet(MAX_WAIT)
        monitor = CpuMonitor()
        trainer.train()
        noise = monitor.read()  # covers warm-up too: TRL's loop cannot be paused
    measured = [n for step in lengths[warmup:] for n in step]
    wall = marks[-1] - marks[warmup - 1]
    step_times = [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    flops = sequence_flops(model_dims(policy), [(n, n * n / 2) for n in measured], reference=not precompute)
    return {
        "label": "trl", "trl_version": __import__("trl").__version__, "precompute_ref_log_probs": precompute,
        "torch_compile": compile, "keep_cpu_memory": keep_memory,
        "batch_pairs": cfg.batch_size, "mean_seq_tokens": round(statistics.mean(measured), 1),
        "steps": steps, "warmup": warmup, "setup_s": round(setup_s, 2),
        "tokens_per_s": sum(measured) / wall, "step_s_median": statistics.median(step_times),
        "model_gflops_per_s": flops / wall / 1e9, "mfu": flops / wall / 1e9 / peak_gflops, **noise,
        "waited_for_quiet_s": waited,
    }


# ----------------------------------------------------------------------------
# Output.

def fmt_bytes(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if n is not None else "-"


def print_table(results: list[dict], peak: float, peak_what: str) -> None:
    print(f"\npeak: {peak:,.0f} GFLOP/s ({peak_what}, measured now); threads: {torch.get_num_threads()}")
    head = ["run", "tokens/s", "step s", "data", "fwd", "ref", "bwd", "opt", "GFLOP/s", "MFU",
            "peak mem", "opt state", "other CPU"]
    rows = []
    for r in results:
        s = r.get("split_s", {})
        ms = lambda k: f"{1000 * s[k]:.0f}ms" if k in s else "-"  # noqa: E731
        rows.append([r["label"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s_median']:.3f}", ms("data"), ms("forward"),
                     ms("reference"), ms("backward"), ms("optimizer"), f"{r['model_gflops_per_s']:.0f}",
                     f"{100 * r['mfu']:.1f}%", fmt_bytes(r.get("peak_memory_bytes")),
                     fmt_bytes(r.get("optimizer_state_bytes")),
                     f"{r['other_cpu_pct']}%" if r.get("other_cpu_pct") is not None else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def run_block_in_subprocess(who: str, args, peak: float, extra: list[str] = ()) -> dict:
    """One --vs-trl measurement in a fresh Python process, so that neither
    side inherits the other's state (TRL/accelerate singletons, compile
    caches, allocator), whatever the order."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--block", who, "--peak", str(peak),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--max-wait", str(args.max_wait), *(["--threads", str(args.threads)] if args.threads else []),
           *(["--trl-compile", args.trl_compile] if args.trl_compile else []),
           *(["--trl-keep-cpu-memory"] if args.trl_keep_cpu_memory else []), "--", *args.overrides, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {who} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interleaved(args, peak: float, blocks: list[tuple[str, str]]) -> list[dict]:
    """Each block (who: "trl" or "ours", variant: extra overrides) once per
    round, in fresh processes, the order reversed every other round (A B C,
    C B A, ...) so that drifting machine speed hits all alike. Labelled
    "<variant, or trl/prefopt> #<round>"."""
    results = []
    for i in range(args.rounds):
        for who, variant in (blocks if i % 2 == 0 else blocks[::-1]):
            r = run_block_in_subprocess(who, args, peak, variant.split())
            r["label"] = f"{variant or r['label']} #{i + 1}"
            r["variant"] = variant
            results.append(r)
            print(f"{r['label']}: {r['tokens_per_s']:,.0f} tokens/s, other CPU {r['other_cpu_pct']}%", file=sys.stderr)
    return results


def summarize_variants(results: list[dict], variants: list[str], peak: float) -> dict:
    rows = []
    for variant in variants:
        mine = [r for r in results if r["variant"] == variant]
        rows.append({"overrides": variant,
                     "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in mine), 1),
                     "tokens_per_s_best": round(max(r["tokens_per_s"] for r in mine), 1),
                     "mfu_median": round(statistics.median(r["mfu"] for r in mine), 4),
                     "other_cpu_pct_max": max((r["other_cpu_pct"] or 0) for r in mine)})
    for row in rows:
        row["vs_first_median"] = round(row["tokens_per_s_median"] / rows[0]["tokens_per_s_median"], 3)
    return {"variants": rows, "peak_gflops": round(peak, 1), "threads": torch.get_num_threads()}


def write_results(path, summary: dict, peak_what: str, results: list[dict]) -> Path:
    out = Path(path or ROOT / "runs" / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "peak_what": peak_what, "runs": results}, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (e.g. "
                                                     "loss.precompute_reference=true)")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (default 3)")
    parser.add_argument("--vs-trl", action="store_true", help="also run TRL's DPOTrainer on the same setup")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--vs-trl / --variant: rounds of the blocks in ABBA order; the median of each is reported")
    parser.add_argument("--trl-compile", choices=["true", "false"], default=None,
                        help="--vs-trl: TrainingArguments.torch_compile for TRL (default: as our compile=, "
                             "except with precomputed reference log-probs, which TRL 1.16 cannot compile)")
    parser.add_argument("--trl-keep-cpu-memory", action="store_true",
                        help="--vs-trl: give TRL's process our CPU malloc setting too (see utils.keep_cpu_memory)")
    parser.add_argument("--variant", action="append", metavar="OVERRIDES",
                        help="compare settings of ours: one measurement per variant (extra overrides, space-"
                             "separated; '' = none) per round, interleaved ABBA in fresh processes; repeatable")
    parser.add_argument("--block", choices=["trl", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--max-wait", type=float, default=120,
                        help="wait up to this many seconds for other processes to go quiet before each measurement")
    parser.add_argument("--peak-size", type=int, default=4096, help="matrix size of the peak-FLOP/s matmul")
    parser.add_argument("--out", default=None, help="JSON output file (default runs/bench/bench-<time>.json)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step pays one-time costs)")
    if args.variant and args.vs_trl:
        parser.error("--variant compares settings of ours; run --vs-trl separately")
    if args.threads:
        torch.set_num_threads(args.threads)
    global MAX_WAIT
    MAX_WAIT = args.max_wait
    sys.path.insert(0, str(ROOT))
    from utils import ConfigError, fail, resolve_device

    overrides = list(args.overrides)
    if args.block:  # one measurement for --vs-trl, in a fresh process: its result is the last line
        cfg = compose(BENCH_OVERRIDES + overrides)
        if args.block == "trl":
            precompute = bool(cfg.loss.get("precompute_reference", False))
            # TRL's torch_compile=True with precompute_ref_log_probs=True fails in trl 1.16.0 (its
            # `self.ref_model or self.model` calls len() on the compiled reference), so by default TRL
            # compiles when we do and no reference log-probs are precomputed.
            trl_compile = (bool(cfg.get("compile", False)) and not precompute if args.trl_compile is None
                           else args.trl_compile == "true")
            r = run_trl(overrides, args.steps, args.warmup, args.peak, precompute, trl_compile,
                        args.trl_keep_cpu_memory)
        else:
            r = run_ours(overrides, args.steps, args.warmup, args.peak)
        print(json.dumps(r))
        return
    try:
        device = resolve_device(compose(BENCH_OVERRIDES + overrides).device)
        wait_for_quiet(MAX_WAIT)
        peak, peak_what = measure_peak_gflops(device, args.peak_size)
        results = []
        if args.variant:
            results = run_interleaved(args, peak, [("ours", variant) for variant in args.variant])
        elif args.vs_trl:
            results = run_interleaved(args, peak, [("trl", ""), ("ours", "")])
        else:
            results.append(run_ours(overrides, args.steps, args.warmup, peak))
        peak_after, _ = measure_peak_gflops(device, args.peak_size)
    except ConfigError as e:
        fail(str(e))
    if peak_after > peak:  # MFU against the better of the two peak measurements
        for r in results:
            r["mfu"] = r["model_gflops_per_s"] / peak_after
        peak = peak_after
    print_table(results, peak, peak_what)
    if args.variant:
        summary = summarize_variants(results, args.variant, peak)
        out = write_results(args.out, summary, peak_what, results)
        print(f"wrote {out}")
        print(json.dumps(summary))
        return
    ours = [r for r in results if r["label"].startswith("prefopt")]
    trl = [r for r in results if r["label"].startswith("trl")]
    # Headline: the best block of each side. Other processes can only slow a
    # block down, so the best one is the least disturbed; medians and every
    # block's figures (with the CPU others used meanwhile) are kept beside it.
    best = lambda rs: max(rs, key=lambda r: r["tokens_per_s"])  # noqa: E731
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    summary = {"tokens_per_s": round(best(ours)["tokens_per_s"], 1), "mfu": round(best(ours)["mfu"], 4),
               "peak_gflops": round(peak, 1), "params": ours[0]["params"], "device": ours[0]["device"],
               "threads": torch.get_num_threads(), "other_cpu_pct": best(ours)["other_cpu_pct"],
               "other_cpu_pct_max": max((r["other_cpu_pct"] or 0) for r in results),
               # loss.precompute_reference: setup time and whether the reference cache was read ("hit")
               "setup_s": best(ours)["setup_s"], "reference_cache": best(ours)["reference_cache"]}
    if trl:
        summary.update(trl_tokens_per_s=round(best(trl)["tokens_per_s"], 1), trl_mfu=round(best(trl)["mfu"], 4),
                       trl_other_cpu_pct=best(trl)["other_cpu_pct"],
                       ratio_vs_trl=round(best(ours)["tokens_per_s"] / best(trl)["tokens_per_s"], 3),
                       ratio_vs_trl_median=round(med(ours, "tokens_per_s") / med(trl, "tokens_per_s"), 3),
                       precompute_reference=ours[0]["precompute_reference"], trl_compile=trl[0]["torch_compile"],
                       trl_keep_cpu_memory=trl[0]["keep_cpu_memory"], share_prompt=ours[0]["share_prompt"],
                       keep_cpu_memory=ours[0]["keep_cpu_memory"])
    out = write_results(args.out, summary, peak_what, results)
    print(f"wrote {out}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
