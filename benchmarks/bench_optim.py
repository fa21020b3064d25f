"""
Benchmark optimizer.step() time and optimizer-state memory on a random Llama.

    python benchmarks/bench_optim.py --model llama-30m --steps 30
    python benchmarks/bench_optim.py --optimizers AdamW,adam_mini --weight-decay 0.1
    python benchmarks/bench_optim.py --optimizers AdamW,RMSprop,Adafactor,AdamW8bit,Lion   # any registry name

One real forward/backward on random tokens makes realistic gradients; every
optimizer gets its own copy of the model with those gradients and they are
reused on every step (optimizers do not modify .grad). The optimizers are
stepped interleaved (A, B, C, A, B, C, ...) so that machine noise hits all of
them alike; warm-up steps are dropped and the median is reported. The state
size is exact: the bytes of the unique storages of every tensor in
optimizer.state. The last line is JSON with the adam_mini / AdamW(fused) ratio.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as `python benchmarks/bench_optim.py`
from prefopt.memory import optimizer_state_bytes
from prefopt.optim.adam_mini import build_adam_mini, official_adam_mini

MODELS = Path(__file__).resolve().parents[1] / "config" / "model"   # --model <name>: config/model/<name>.yaml


def _official(model, lr, weight_decay):
    Adam_mini = official_adam_mini()
    cfg = model.config
    return Adam_mini(model.named_parameters(), lr=lr, weight_decay=weight_decay,
                     dim=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                     n_kv_heads=cfg.num_key_value_heads, verbose=False)


# Variants that are not registry names (implementation choices, the official
# package); any other name goes through the registry as a run would build it.
OPTIMIZERS = {
    "AdamW": lambda m, lr, wd: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd, fused=True),
    "AdamW-foreach": lambda m, lr, wd: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd, foreach=True),
    "adam_mini": lambda m, lr, wd: build_adam_mini(m, lr=lr, weight_decay=wd),
    "adam_mini-neuron": lambda m, lr, wd: build_adam_mini(m, lr=lr, weight_decay=wd, partition="neuron"),
    "adam_mini_official": _official,
}
DEFAULT_OPTIMIZERS = "AdamW,AdamW-foreach,adam_mini,adam_mini-neuron,adam_mini_official"


def build_optimizer(name, model, lr, weight_decay):
    if name in OPTIMIZERS:
        return OPTIMIZERS[name](model, lr, weight_decay)
    from prefopt import optim as optimizers

    node = optimizers.signature_defaults(optimizers.get_entry(name).target)
    if "weight_decay" in node:
        node["weight_decay"] = weight_decay
    return optimizers.build_optimizer(model, name, node, lr, torch.device("cpu"), run_values={"max_steps": 10**6})


def build_model(name, seed=0):
    """A random-init model from config/model/<name>.yaml (its `config` node
    must give vocab_size: there is no tokenizer here)."""
    from omegaconf import OmegaConf

    from prefopt.models import transformers_config

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers_config(OmegaConf.load(MODELS / f"{name}.yaml"))
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(p.stem for p in MODELS.glob("llama-*m.yaml")), default="llama-30m",
                    help="config/model/<name>.yaml")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer")
    ap.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                    help="comma-separated names: registry names (optimizer=...) or " + ", ".join(OPTIMIZERS))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    from prefopt import optim as optimizers
    from utils import ConfigError

    try:
        for n in names:
            if n not in OPTIMIZERS:
                optimizers.get_entry(n)  # unknown or refused: one line, with the valid names
    except ConfigError as e:
        ap.error(str(e))
    if "adam_mini_official" in names and official_adam_mini() is None:
        print("adam_mini_official: package not installed, skipped")
        names.remove("adam_mini_official")

    # one real backward pass for realistic gradients
    base = build_model(args.model)
    tokens = torch.randint(0, base.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    base(input_ids=tokens, labels=tokens).loss.backward()
    n_params = sum(p.numel() for p in base.parameters())

    models, opts = {}, {}
    for name in names:
        m = copy.deepcopy(base)  # keeps weight tying, but not .grad
        for p_base, p in zip(base.parameters(), m.parameters()):
            p.grad = p_base.grad.clone()
        models[name], opts[name] = m, build_optimizer(name, m, args.lr, args.weight_decay)

    times = {n: [] for n in names}
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            for name in names:
                t0 = time.perf_counter()
                opts[name].step()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(dt)

    # other processes on the machine make timings noisy: say how busy it was
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: Llama {args.model}, {n_params / 1e6:.2f}M params, fp32, CPU threads={torch.get_num_threads()}, "
          f"weight_decay={args.weight_decay}, {args.steps} timed steps, 1-min load avg {load:.2f}")
    ref = statistics.median(times["AdamW"]) if "AdamW" in times else None
    header = (f"{'optimizer':<20}{'median ms':>10}{'p25 ms':>9}{'vs AdamW':>10}"
              f"{'state bytes':>14}{'bytes/param':>13}")
    print(header)
    print("-" * len(header))
    for name in names:
        med = statistics.median(times[name])
        p25 = statistics.quantiles(times[name], n=4)[0] if len(times[name]) > 1 else med
        ratio = f"{med / ref:.3f}" if ref else "-"
        nbytes = optimizer_state_bytes(opts[name])[0]
        print(f"{name:<20}{med * 1e3:>10.2f}{p25 * 1e3:>9.2f}{ratio:>10}{nbytes:>14,}{nbytes / n_params:>13.3f}")

    result = {"model_size": args.model, "params": n_params, "weight_decay": args.weight_decay,
              "threads": torch.get_num_threads(), "steps": args.steps, "load_avg": round(load, 2)}
    if ref and "adam_mini" in times:
        result["adam_mini_vs_adamw_step_ratio"] = round(statistics.median(times["adam_mini"]) / ref, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
