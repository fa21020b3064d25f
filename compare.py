"""Compare prefopt runs: one table and one PNG, from the run dirs alone.

    python compare.py runs/sweep_2026-01-01_12-00-00            # every run in a sweep
    python compare.py runs/run_a runs/run_b --target-loss 0.5   # or run dirs, or several sweeps
    python compare.py <sweep> --json                            # machine-readable
    python compare.py <sweep> --markdown --plot results.png     # for a README
    python compare.py <sweep> --panels margin,chosen_logps,greedy_acc   # other plot panels

A run dir is a folder holding `metrics.jsonl` and `config.yaml` (what
train.py writes); a sweep dir is a folder whose sub-folders are run dirs (what
`python train.py -m ...` writes). Nothing else is read: no wandb needed.

Columns (all from metrics.jsonl unless said otherwise):
  run              the run dir's name
  optimizer        config.yaml `optimizer.name`, plus `momentum=` and
                   `nesterov` when set (SGD vs SGD with momentum)
  lr               config.yaml `lr`
  loss             config.yaml `loss.name`; for `loss=sum`, its terms
                   (`sum[dpo,sft]`, a weight other than 1 as `0.5*sft`);
                   settings that change what a loss is, in parentheses:
                   `ipo(summed)` (loss.token_average=false), `ld_alpha=`,
                   `f=<f_divergence_type>`, `wpo` (use_weighting),
                   `sync_ref`, `ref_free` (reference_free)
  eval_loss        `loss/eval` at the last eval; best_eval_loss: its minimum
  reward_acc       `rewards_eval/accuracies` at the last eval
  reward_margin    `rewards_eval/margins` at the last eval
                   (reward = beta * log pi/ref; beta * log pi for the
                   reference-free losses simpo, cpo, orpo)
  chosen_drift     `logps_eval/chosen` at the last eval minus at the first
                   (the summed log-prob of the chosen responses: negative =
                   they got less likely, "likelihood displacement"); n/a
                   with fewer than two evals logging it
  greedy_acc       `generate_eval/accuracy` at the last eval (greedy decoding,
                   exact match; verifiable datasets only)
  tokens_per_s     mean of `tokens_per_s` over all log steps
  state_bytes      `memory/optimizer_state_bytes` at the last log step
  state_B/param    state_bytes / number of parameters, where the number of
                   parameters is `memory/params_bytes` / bytes per element of
                   the parameter dtype (config.yaml `precision`: fp32 -> 4,
                   bf16/fp16 -> 2; every parameter has that dtype). AdamW in
                   fp32 is 8 (two fp32 buffers) plus its per-tensor step
                   counters, which is why the value is a hair above 8.
  peak_MiB         max of `memory/peak_bytes` over the log steps, in MiB
                   (GPU: max allocated; CPU: peak RSS of the process)
  steps_to_target  the first eval step with `loss/eval` <= --target-loss;
                   n/a when never reached
  sparsity_bf16    `update/sparsity` at the last log step, and
  sparsity_exact   `update/sparsity_exact` (only when some run logged them:
                   metrics.update_sparsity=true)
A metric a run did not log (KTO logs no reward accuracy or margin, SFT no
rewards at all) is n/a.

The PNG has panels side by side, against the optimizer step: by default
three, eval loss, eval reward margin, and memory (optimizer state, solid;
peak, dashed). `--panels` picks them, in order, from: loss, margin, memory,
reward_acc, chosen_logps (`logps_eval/chosen`), greedy_acc.

A path that is neither a run nor a sweep of runs is refused with one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

RUN_FILES = ("metrics.jsonl", "config.yaml")
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_TARGET_LOSS = 0.5  # DPO starts at ln 2 = 0.693 (policy == reference)
MIB = 2 ** 20


class CompareError(Exception):
    """Something the user pointed us at is not what we need: one line, exit 2."""


# ----------------------------------------------------------------------------
# Finding and reading runs.

def is_run(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in RUN_FILES)


def _natural_key(path: Path):
    """Sweep jobs are named `<num>_...`: sort 2 before 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_runs(paths: list[str]) -> list[Path]:
    runs: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if is_run(path):
            found = [path]
        elif path.is_dir():
            found = sorted((d for d in path.iterdir() if is_run(d)), key=_natural_key)
        else:
            found = []
        if not found:
            what = "does not exist" if not path.exists() else "is not a folder" if not path.is_dir() else \
                "is not a run (no metrics.jsonl + config.yaml) nor a sweep folder of runs"
            raise CompareError(f"{arg} {what}; pass run dirs or sweep dirs written by train.py")
        runs += [r for r in found if r.resolve() not in {x.resolve() for x in runs}]
    return runs


def read_metrics(run: Path) -> list[dict]:
    rows = []
    for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line cut short by a killed run
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            print(f"warning: {run / 'metrics.jsonl'}:{n} is not a metrics row; skipped", file=sys.stderr)
    # A second run started in the same run dir (without resume=true) appends
    # from step 0 again: keep only the newest one.
    restarts = [i for i in range(1, len(rows)) if rows[i]["step"] < rows[i - 1]["step"]]
    if restarts:
        print(f"warning: {run / 'metrics.jsonl'} holds {len(restarts) + 1} runs (the step goes back); "
              "using the last one", file=sys.stderr)
        rows = rows[restarts[-1]:]
    return rows


def read_config(run: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise CompareError(f"{run / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("optimizer"), dict):
        raise CompareError(f"{run / 'config.yaml'} is not a prefopt run config (no optimizer section)")
    return cfg


# ----------------------------------------------------------------------------
# One row per run.

def optimizer_label(opt: dict) -> str:
    label = str(opt.get("name"))
    extras = []
    if opt.get("momentum"):
        m = opt["momentum"]
        extras.append(f"momentum={m:g}" if isinstance(m, (int, float)) else f"momentum={m}")
    if opt.get("nesterov"):
        extras.append("nesterov")
    return f"{label}({', '.join(extras)})" if extras else label


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _drift(rows: list[dict], key: str):
    """The last value of `key` minus its first; None unless logged twice. A NaN
    is skipped: KTO logs NaN for the desirable/undesirable metrics of a batch
    that has no such rows."""
    values = [r[key] for r in rows if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return values[-1] - values[0] if len(values) >= 2 else None


def _weighted(term, weight) -> str:
    return str(term) if weight in (None, 1, 1.0) else f"{weight:g}*{term}" if isinstance(weight, (int, float)) \
        else f"{weight}*{term}"


def loss_label(loss: dict) -> str | None:
    """`loss.name`, with what makes it a different loss: a sum's terms, IPO's
    summed form, and the modifiers that change the objective."""
    name = loss.get("name")
    if name is None:
        return None
    label = str(name)
    if name == "sum" and loss.get("terms"):
        weights = loss.get("weights") or [None] * len(loss["terms"])
        label += "[" + ",".join(_weighted(t, w) for t, w in zip(loss["terms"], weights)) + "]"
    extras = []
    if name == "ipo" and loss.get("token_average") is False:
        extras.append("summed")
    if loss.get("ld_alpha") is not None:
        extras.append(f"ld_alpha={loss['ld_alpha']:g}" if isinstance(loss["ld_alpha"], (int, float))
                      else f"ld_alpha={loss['ld_alpha']}")
    if loss.get("f_divergence_type") not in (None, "reverse_kl"):
        extras.append(f"f={loss['f_divergence_type']}")
    for key, shown in (("use_weighting", "wpo"), ("sync_ref_model", "sync_ref"), ("reference_free", "ref_free")):
        if loss.get(key) is True:
            extras.append(shown)
    return f"{label}({','.join(extras)})" if extras else label


def summarize(run: Path, target_loss: float) -> dict:
    cfg = read_config(run)
    rows = read_metrics(run)
    evals = [r for r in rows if "loss/eval" in r]
    logs = [r for r in rows if "memory/optimizer_state_bytes" in r]
    last_log = logs[-1] if logs else {}
    precision = cfg.get("precision", "fp32")
    params_bytes = last_log.get("memory/params_bytes")
    n_params = params_bytes // BYTES_PER_ELEMENT[precision] if params_bytes and precision in BYTES_PER_ELEMENT else None
    state = last_log.get("memory/optimizer_state_bytes")
    tokens = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    peaks = [r["memory/peak_bytes"] for r in rows if "memory/peak_bytes" in r]
    reached = [r["step"] for r in evals if r["loss/eval"] <= target_loss]
    return {
        "run": run.name,
        "path": str(run),
        "optimizer": optimizer_label(cfg["optimizer"]),
        "lr": cfg.get("lr"),
        "loss": loss_label(cfg.get("loss") or {}),
        "steps": rows[-1]["step"] if rows else None,
        "eval_loss": evals[-1]["loss/eval"] if evals else None,
        "best_eval_loss": min(r["loss/eval"] for r in evals) if evals else None,
        "reward_acc": _last(evals, "rewards_eval/accuracies"),
        "reward_margin": _last(evals, "rewards_eval/margins"),
        "chosen_drift": _drift(evals, "logps_eval/chosen"),
        "greedy_acc": _last(evals, "generate_eval/accuracy"),
        "tokens_per_s": sum(tokens) / len(tokens) if tokens else None,
        "state_bytes": state,
        "params": n_params,
        "state_bytes_per_param": state / n_params if state is not None and n_params else None,
        "peak_bytes": max(peaks) if peaks else None,
        "steps_to_target": reached[0] if reached else None,
        "sparsity_bf16": _last(logs, "update/sparsity"),
        "sparsity_exact": _last(logs, "update/sparsity_exact"),
        "_curves": _curves(evals, logs),
    }


# name -> (metric, rows it is read from); a curve `name` and its steps `<name>_step`
CURVES = {"eval_loss": ("loss/eval", "evals"), "margin": ("rewards_eval/margins", "evals"),
          "reward_acc": ("rewards_eval/accuracies", "evals"), "chosen": ("logps_eval/chosen", "evals"),
          "greedy": ("generate_eval/accuracy", "evals"), "state": ("memory/optimizer_state_bytes", "logs"),
          "peak": ("memory/peak_bytes", "logs"), "tokens": ("tokens", "logs")}   # tokens: cumulative, trained on


def _curves(evals: list[dict], logs: list[dict]) -> dict[str, list]:
    """Each curve of CURVES over the rows that logged its metric, with its steps."""
    rows = {"evals": evals, "logs": logs}
    curves = {}
    for name, (key, source) in CURVES.items():
        kept = [r for r in rows[source] if key in r]
        curves[f"{name}_step"], curves[name] = [r["step"] for r in kept], [r[key] for r in kept]
    return curves


# ----------------------------------------------------------------------------
# The table.

def columns(summaries: list[dict], target_loss: float) -> list[tuple[str, str, callable]]:
    """(header, key, formatter) for the table."""
    def num(fmt):
        return lambda v: "n/a" if v is None else format(v, fmt)

    cols = [
        ("run", "run", str),
        ("optimizer", "optimizer", str),
        ("lr", "lr", num("g")),
        ("loss", "loss", lambda v: "n/a" if v is None else str(v)),
        ("eval_loss", "eval_loss", num(".4f")),
        ("best_eval_loss", "best_eval_loss", num(".4f")),
        ("reward_acc", "reward_acc", num(".3f")),
        ("reward_margin", "reward_margin", num(".4f")),
        ("chosen_drift", "chosen_drift", num("+.3f")),
        ("greedy_acc", "greedy_acc", num(".3f")),
        ("tokens_per_s", "tokens_per_s", num(".0f")),
        ("state_bytes", "state_bytes", num(",d")),
        ("state_B/param", "state_bytes_per_param", num(".3f")),
        ("peak_MiB", "peak_bytes", lambda v: "n/a" if v is None else f"{v / MIB:.1f}"),
        (f"steps_to_{target_loss:g}", "steps_to_target", lambda v: "n/a" if v is None else str(v)),
    ]
    if any(s["sparsity_bf16"] is not None for s in summaries):
        cols += [("sparsity_bf16", "sparsity_bf16", num(".6f")), ("sparsity_exact", "sparsity_exact", num(".6f"))]
    return cols


def format_table(summaries: list[dict], target_loss: float, markdown: bool = False) -> str:
    cols = columns(summaries, target_loss)
    cells = [[fmt(s[key]) for _, key, fmt in cols] for s in summaries]
    return render_table([h for h, _, _ in cols], cells, markdown, left={"run", "optimizer", "loss"})


def render_table(headers: list[str], cells: list[list[str]], markdown: bool = False, left=()) -> str:
    """Rows of already formatted cells as Markdown, or as aligned text (the
    `left` columns left-aligned, numbers right-aligned). Shared with study.py."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if h in left else v.rjust(w) for v, w, h in zip(values, widths, headers)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in cells])


# ----------------------------------------------------------------------------
# The plot.

def default_plot_path(args_paths: list[str], runs: list[Path]) -> Path:
    """`<sweep>/compare.png` for one sweep dir; else beside the runs when they
    share a parent; else in the current folder."""
    if len(args_paths) == 1 and not is_run(Path(args_paths[0])):
        return Path(args_paths[0]) / "compare.png"
    parents = {r.resolve().parent for r in runs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare.png"


def _spread_out(peaks: list[float]) -> bool:
    """One curve far above the rest (e.g. a run whose margin explodes)."""
    peaks = sorted(abs(p) for p in peaks if p is not None)
    return len(peaks) > 2 and peaks[-1] > 10 * max(peaks[len(peaks) // 2], 1e-12)


# name -> (title, x curve, y curve); "loss" and "memory" are drawn by hand below.
PANELS = {
    "loss": ("eval loss (loss/eval)", "eval_loss_step", "eval_loss"),
    "margin": ("eval reward margin (rewards_eval/margins)", "margin_step", "margin"),
    "memory": ("memory: optimizer state (solid), peak (dashed)", None, None),
    "reward_acc": ("eval reward accuracy (rewards_eval/accuracies)", "reward_acc_step", "reward_acc"),
    "chosen_logps": ("log-prob of the chosen responses (logps_eval/chosen)", "chosen_step", "chosen"),
    "greedy_acc": ("greedy accuracy (generate_eval/accuracy)", "greedy_step", "greedy"),
}
DEFAULT_PANELS = ("loss", "margin", "memory")


def parse_panels(text: str) -> tuple[str, ...]:
    panels = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in panels if p not in PANELS]
    if unknown or not panels:
        raise CompareError(f"--panels {text}: {'unknown panel ' + unknown[0] if unknown else 'no panel'}; "
                           f"choose among {', '.join(PANELS)}")
    return panels


def legend_label(s: dict, summaries: list[dict]) -> str:
    """The run's name, plus its optimizer and loss where the runs differ in them."""
    label = s["run"]
    if len({x["optimizer"] for x in summaries}) > 1:
        label += f": {s['optimizer']}"
    if len({x["loss"] for x in summaries}) > 1 and str(s["loss"]) not in s["run"]:
        label += f": {s['loss']}"
    return label


def write_plot(summaries: list[dict], path: Path, target_loss: float,
               panels: tuple[str, ...] = DEFAULT_PANELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(summaries)
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    markers = "os^Dv*"
    rows_of_legend = math.ceil(n / 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(16 * len(panels) / 3, 4.6 + 0.22 * rows_of_legend),
                             sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[0]))
    handles = []
    for i, s in enumerate(summaries):
        c, color, marker = s["_curves"], colors[i % len(colors)], markers[(i // len(colors)) % len(markers)]
        for name, ax in axes.items():
            if name == "memory":
                ax.plot(c["state_step"], [b / MIB for b in c["state"]], color=color)
                ax.plot(c["peak_step"], [b / MIB for b in c["peak"]], color=color, ls="--", alpha=0.7)
            else:
                _, x, y = PANELS[name]
                ax.plot(c[x], c[y], marker=marker, ms=3, color=color)
        handles.append(Line2D([], [], marker=marker, ms=3, color=color,
                                   label=legend_label(s, summaries)))
    for name, ax in axes.items():
        title = PANELS[name][0]
        if name == "loss":
            low, high = ax.get_ylim()
            if math.isfinite(target_loss) and low <= target_loss <= high:  # only when the curves come near it
                ax.axhline(target_loss, color="grey", lw=0.8, ls=":")
        if name in ("margin", "chosen_logps"):
            key = "margin" if name == "margin" else "chosen"
            if _spread_out([max(s["_curves"][key], key=abs, default=None) for s in summaries]):
                ax.set_yscale("symlog", linthresh=1.0)   # keep the ordinary runs readable next to an outlier
                title += ", symlog"
        if name == "memory":
            ax.set(ylabel="MiB, symlog")
            ax.set_yscale("symlog", linthresh=1.0)  # 0 (SGD) and both scales on one axis
            ax.set_ylim(bottom=0)
        if name in ("reward_acc", "greedy_acc"):
            ax.set_ylim(-0.03, 1.03)
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=min(n, 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.17 * rows_of_legend + 0.1) / fig.get_figheight(), 1, 1))  # room for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run dirs and/or sweep dirs")
    parser.add_argument("--target-loss", type=float, default=DEFAULT_TARGET_LOSS,
                        help=f"eval loss for the steps-to-target column (default {DEFAULT_TARGET_LOSS})")
    parser.add_argument("--plot", help="PNG path (default: <sweep>/compare.png)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--panels", default=",".join(DEFAULT_PANELS),
                        help=f"the PNG's panels, comma-separated, from {', '.join(PANELS)} "
                             f"(default {','.join(DEFAULT_PANELS)})")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of the table")
    out.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        panels = parse_panels(args.panels)
        runs = find_runs(args.paths)
        summaries = [summarize(run, args.target_loss) for run in runs]
        plot = None
        if not args.no_plot:
            plot = Path(args.plot) if args.plot else default_plot_path(args.paths, runs)
            write_plot(summaries, plot, args.target_loss, panels)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.json:
        public = [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries]
        print(json.dumps({"target_loss": args.target_loss, "plot": str(plot) if plot else None, "runs": public},
                         indent=2))
    else:
        print(format_table(summaries, args.target_loss, markdown=args.markdown))
        if plot:
            print(f"\nplot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
