"""The command line as train.py reads it before Hydra starts
(config_checks.check_command_line): Hydra's own flags and their values pass
through, the overrides after them are still checked, and a `-m` sweep is
expanded into its jobs exactly as Hydra's basic sweeper does, every job
composed and checked before the first one starts."""
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest
import torch
from conftest import FAST, MICRO_MODEL, run_cli

from prefopt import config_checks
from prefopt import optim as optimizers
from utils import ConfigError

# The 21-optimizer sweep of the README's results table.
README_SWEEP = ("AdamW,Adam,RMSprop,SGD,Adafactor,adam_mini,Adagrad,Adamax,NAdam,RAdam,ASGD,Adadelta,Rprop,Muon,"
                "Lion,AdamW8bit,CAME,Adan,Prodigy,ScheduleFreeAdamW,SOAP")


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path, monkeypatch):
    """Relative run dirs (runs/...) are probed for writing: in a scratch folder."""
    monkeypatch.chdir(tmp_path)


def refused(*argv: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_checks.check_command_line(list(argv))
    message = str(e.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------
# Hydra's flags, in process.

# Every flag of Hydra's own parser (hydra/_internal/utils.py get_args_parser),
# long and short, with a value where it takes one.
FLAGS = [
    ["--cfg", "job"], ["-c", "job"], ["--cfg", "hydra"], ["-c", "all"], ["--cfg", "job", "--resolve"],
    ["--cfg", "job", "--package", "optimizer"], ["-c", "job", "-p", "optimizer"],
    ["--info"], ["--info", "config"], ["-i", "defaults-tree"], ["--info", "plugins"], ["-i", "searchpath"],
    ["--help"], ["-h"], ["--help", "--resolve"], ["--hydra-help"], ["--run"], ["-r"], ["-m"], ["--multirun"],
    ["--config-path", "config"], ["-cp", "config"], ["--config-name", "config"], ["-cn", "config"],
    ["--config-dir", "."], ["-cd", "."],
]
SKIPPED_FLAGS = [["--shell-completion"], ["-sc"], ["--experimental-rerun", "saved.pickle"], ["--version"]]


def test_the_flags_here_are_all_of_hydras_flags():
    from hydra._internal.utils import get_args_parser

    hydras = {s for action in get_args_parser()._actions for s in action.option_strings}
    assert hydras == {a for argv in FLAGS + SKIPPED_FLAGS for a in argv if a.startswith("-")}


def with_flags(flags: list[str], *overrides: str) -> list[str]:
    """Overrides after the flags, except after a bare --info, whose optional
    value would be the first override (for Hydra too: `--info all lr=...`)."""
    return [*overrides, *flags] if flags[-1] in ("--info", "-i") else [*flags, *overrides]


@pytest.mark.parametrize("flags", FLAGS, ids=" ".join)
def test_hydra_flags_pass_and_the_overrides_with_them_are_checked(flags):
    args = config_checks.hydra_args(with_flags(flags, "lr=1e-3", "optimizer=SGD"))
    assert args.overrides == ["lr=1e-3", "optimizer=SGD"]        # a flag's value is no override
    config_checks.check_command_line(with_flags(flags, "lr=1e-3", "optimizer=SGD", "optimizer.momentum=0.9"))
    message = refused(*with_flags(flags, "max_step=1"))
    assert "unknown config key 'max_step'" in message, message


@pytest.mark.parametrize("flags", SKIPPED_FLAGS, ids=" ".join)
def test_flags_whose_arguments_are_not_overrides_are_left_to_hydra(flags):
    config_checks.check_command_line([*flags, "install=bash"])


def test_flags_hydra_would_refuse_with_a_traceback_are_one_line():
    assert refused("--cfg", "jobb") == ("argument --cfg/-c: invalid choice: 'jobb' (choose from 'job', 'hydra', 'all') "
                                        "(`python train.py --hydra-help` lists Hydra's flags)")
    assert refused("--resolve") == "--resolve works only together with --cfg or --help"
    assert refused("--cfg", "job", "-m") == ("only one of --run, --multirun, --cfg, --info and --shell-completion "
                                             "can be given")
    assert refused("--config-name", "nope").startswith(
        "could not compose the config (Cannot find primary config 'nope'")


def test_show_only_flags_check_keys_and_types_but_not_the_run():
    """--cfg prints the config: a run dir without a checkpoint is no reason to refuse."""
    config_checks.check_command_line(["--cfg", "job", "resume=true"])
    assert refused("resume=true").startswith("resume=true but ")
    assert refused("--cfg", "job", "max_steps=ten") == "max_steps='ten' should be an integer (default: 100)"


def test_config_dir_adds_an_optimizer_yaml(tmp_path):
    (tmp_path / "extra" / "optimizer").mkdir(parents=True)
    (tmp_path / "extra" / "optimizer" / "MySGD.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /optimizer_base/SGD@optimizer\n  - _self_\nlr: 0.2\n")
    config_checks.check_command_line(["-cd", "extra", "optimizer=MySGD", "optimizer.momentum=0.9"])
    assert "did you mean MySGD?" in refused("-cd", "extra", "optimizer=MySGDD")
    assert refused("-cd", "nowhere").startswith("--config-dir nowhere: no such folder")


# ----------------------------------------------------------------------------
# Optimizer keywords: their config nodes and kinds come from the signature.

def test_float_keywords_with_a_zero_default_are_numbers():
    sgd = optimizers.signature_defaults(torch.optim.SGD)
    assert sgd["momentum"] == 0.0 and type(sgd["momentum"]) is float and type(sgd["dampening"]) is float
    assert type(optimizers.signature_defaults(torch.optim.Adam)["weight_decay"]) is float
    assert optimizers.signature_defaults(torch.optim.Rprop)["step_sizes"] == [1e-6, 50.0]
    muon = optimizers.signature_defaults(optimizers.build_muon)
    assert muon["ns_steps"] == 5 and type(muon["ns_steps"]) is int      # a real integer keyword stays one
    kinds = optimizers.keyword_kinds(torch.optim.SGD)
    assert kinds["momentum"].describe() == "a number" and kinds["fused"].describe() == "true/false or null"
    assert optimizers.keyword_kinds(optimizers.build_muon)["ns_steps"].describe() == "an integer"


def _annotated(params, lr=1e-3, betas: tuple[float, float] | tuple[float, float, float] = (0.9, 0.99),
               eps: tuple[float | None, float] = (None, 1e-3), resets: tuple[int, ...] = (2,),
               decay: float | torch.Tensor = 0, steps: int = 5, fn: Callable | None = None,
               mode: Literal["a", "b"] = "a"):
    pass


def _bare(params, lr=1e-3, momentum=0, betas=(0.9, 0.999), bits=32, name="x", flag=False):
    pass


def test_kinds_from_annotations_and_from_bare_defaults():
    kinds = {k: v.describe() for k, v in optimizers.keyword_kinds(_annotated).items() if v}
    assert kinds == {"betas": "a list of 2 or 3 numbers", "eps": "a list of 2 items (a number or null, a number)",
                     "resets": "a list of integers", "decay": "a number", "steps": "an integer", "mode": "a string"}
    assert optimizers.signature_defaults(_annotated)["decay"] == 0.0
    # Without annotations an int default says "a number" and stays as it is in the node.
    bare = optimizers.keyword_kinds(_bare)
    assert {k: v.describe() for k, v in bare.items()} == {
        "momentum": "a number", "betas": "a list of 2 numbers", "bits": "a number", "name": "a string",
        "flag": "true/false"}
    assert bare["bits"].accepts(8) and bare["momentum"].accepts(0.9) and not bare["momentum"].accepts("high")
    assert optimizers.signature_defaults(_bare) == {"momentum": 0, "betas": [0.9, 0.999], "bits": 32, "name": "x",
                                                    "flag": False}


def test_every_registry_node_is_accepted_by_its_own_kinds():
    for name, entry in optimizers.registry().items():
        if entry.target is None:
            continue
        kinds = optimizers.keyword_kinds(entry.target)
        for key, value in optimizers.signature_defaults(entry.target).items():
            kind = kinds[key]
            assert value is None or kind is None or kind.accepts(value), (name, key, value, kind.describe())


# ----------------------------------------------------------------------------
# Multirun, in process.

def test_sweep_jobs_are_hydras_cartesian_product():
    jobs = config_checks.sweep_jobs(["optimizer=AdamW,SGD", "lr=1e-3,1e-2", "max_steps=5", "hydra.sweep.dir=d"])
    assert jobs == [["hydra.sweep.dir=d", "optimizer=AdamW", "lr=0.001", "max_steps=5"],
                    ["hydra.sweep.dir=d", "optimizer=AdamW", "lr=0.01", "max_steps=5"],
                    ["hydra.sweep.dir=d", "optimizer=SGD", "lr=0.001", "max_steps=5"],
                    ["hydra.sweep.dir=d", "optimizer=SGD", "lr=0.01", "max_steps=5"]]
    assert config_checks.sweep_jobs(["max_steps=range(1,4)"]) == [["max_steps=1"], ["max_steps=2"], ["max_steps=3"]]
    assert config_checks.sweep_jobs([]) == [[]]


def test_multirun_checks_every_job_before_the_first():
    assert refused("-m", "max_steps=2,ten") == (
        "multirun job #1 of 2 (max_steps=ten): max_steps='ten' should be an integer (default: 100)")
    assert refused("-m", "lr=1e-3,-0.1") == "multirun job #1 of 2 (lr=-0.1): lr=-0.1 must be >= 0"
    assert refused("-m", "max_steps=range(0,3)") == "multirun job #0 of 3 (max_steps=0): max_steps=0 must be >= 1"
    # a keyword of one optimizer is an unknown key for another
    assert refused("-m", "optimizer=SGD,AdamW", "optimizer.momentum=0.9").startswith(
        "multirun job #1 of 2 (optimizer=AdamW): unknown config key 'optimizer.momentum'")
    assert refused("-m", "optimizer=SGD,RMSprop", "optimizer.betas=[0.9,0.99]").startswith(
        "multirun job #0 of 2 (optimizer=SGD): unknown config key 'optimizer.betas'")
    assert refused("-m", "optimizer.betas=[0.9,0.99],[0.9]") == (
        "multirun job #1 of 2 (optimizer.betas=[0.9]): optimizer.betas=[0.9] should be a list of 2 numbers "
        "(default: [0.9, 0.999])")
    assert refused("-m", "lr=interval(0,1)").startswith(
        "could not read the command line (BasicSweeper does not support sweep type : INTERVAL_SWEEP)")
    config_checks.check_command_line(["-m", "optimizer=SGD,RMSprop", "optimizer.momentum=0,0.9", "lr=1e-3,1e-2"])


def test_a_sweep_job_is_checked_in_its_own_run_dir(tmp_path):
    """resume=true in a sweep resumes each job in its sweep subdir, as train.py
    sets run_dir from Hydra's output dir."""
    message = refused("-m", "resume=true", "hydra.sweep.dir=old_sweep")
    assert message.startswith("multirun job #0 of 1 (resume=True")
    assert "old_sweep/0_dpo_AdamW_lr0.001/checkpoints has no checkpoint" in message


def test_one_composition_per_group_choice(monkeypatch):
    """A sweep composes the config once per distinct set of group choices and
    applies the other overrides with Hydra's own last step: 21 optimizers are
    21 compositions, 5 learning rates one."""
    for name in README_SWEEP.split(","):
        entry = optimizers.find_entry(name)
        if entry is None or entry.refuse:
            pytest.skip(f"{name} is not available here")
    calls = []
    compose = config_checks._compose
    monkeypatch.setattr(config_checks, "_compose", lambda *a, **k: calls.append(a) or compose(*a, **k))

    start = time.perf_counter()
    config_checks.check_command_line(["-m", "loss=dpo", "metrics.update_sparsity=true", "eval_every=10",
                                      f"optimizer={README_SWEEP}", "hydra.sweep.dir=runs/optimizers"])
    seconds = time.perf_counter() - start
    assert len(calls) == 21
    print(f"21-optimizer sweep checked in {seconds:.2f} s")

    calls.clear()
    config_checks.check_command_line(["-m", "optimizer=SGD", "lr=1e-3,3e-3,1e-2,3e-2,0.1"])
    assert len(calls) == 1


# ----------------------------------------------------------------------------
# The same as real `python train.py` subprocesses.

SMALL = [*FAST, *MICRO_MODEL, "eval_every=1000"]
COMMANDS = {
    "--cfg job": ["--cfg", "job"],
    "-c job": ["-c", "job", "optimizer=SGD", "optimizer.momentum=0.9"],
    "--cfg job --resolve": ["--cfg", "job", "--resolve"],
    "--info": ["--info"],
    "--help": ["--help"],
    "-m": ["-m", "max_steps=1,2", *SMALL],
    "--cfg job max_step=1": ["--cfg", "job", "max_step=1"],
    "-m bad type": ["-m", "max_steps=2,ten", *SMALL],
    "-m bad value": ["-m", "lr=1e-3,-0.1", "max_steps=2", *SMALL],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """All commands at once, two at a time (most of each is Python start-up);
    each in its own scratch folder."""
    root = tmp_path_factory.mktemp("command_line")
    dirs = {name: root / str(i) for i, name in enumerate(COMMANDS)}
    for d in dirs.values():
        d.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, *args, cwd=dirs[name]) for name, args in COMMANDS.items()}
        return {name: (f.result(), dirs[name]) for name, f in futures.items()}


def test_cli_cfg_job_prints_the_config(cli):
    for name in ("--cfg job", "-c job"):
        r, _ = cli[name]
        assert r.returncode == 0, r.stderr[-2000:]
        assert "\noptimizer:\n  name: " in r.stdout and "\nlr: " in r.stdout
    assert "  name: SGD\n  momentum: 0.9\n" in cli["-c job"][0].stdout


def test_cli_cfg_job_resolve(cli):
    r, _ = cli["--cfg job --resolve"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\noptimizer:\n" in r.stdout and "\nrun_dir: runs/" in r.stdout and "${" not in r.stdout


def test_cli_info_and_help(cli):
    r, _ = cli["--info"]
    assert r.returncode == 0 and "Installed Hydra Plugins" in r.stdout and "Defaults Tree" in r.stdout, r.stderr[-2000:]
    r, _ = cli["--help"]
    assert r.returncode == 0 and "== Config ==" in r.stdout and "\noptimizer:\n" in r.stdout, r.stderr[-2000:]


def test_cli_multirun_runs_every_job(cli):
    r, folder = cli["-m"]
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (folder / "runs").iterdir()
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert r.stdout.count("done: ") == 2


def test_cli_overrides_after_flags_are_checked(cli):
    r, _ = cli["--cfg job max_step=1"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: unknown config key 'max_step'; check its spelling against config/config.yaml "
        "(or `python train.py --cfg job`), or add a new key with +max_step=..."]
    assert r.stdout == ""


@pytest.mark.parametrize("name, line", [
    ("-m bad type", "error: multirun job #1 of 2 (max_steps=ten): max_steps='ten' should be an integer (default: 100)"),
    ("-m bad value", "error: multirun job #1 of 2 (lr=-0.1): lr=-0.1 must be >= 0"),
])
def test_cli_multirun_refuses_a_bad_job_before_the_first_starts(cli, name, line):
    r, folder = cli[name]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [line]
    assert "done: " not in r.stdout and not (folder / "runs").exists()   # job #0 did not run
