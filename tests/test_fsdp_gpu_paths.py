"""trainer=fsdp's GPU code paths, run on the CPU with gloo: bf16 mixed
precision (bf16 compute, fp32 gradient reduction, fp32 master weights and
optimizer state), FSDP2's CPUOffloadPolicy (cpu_offload=true) and activation
checkpointing, each against the same run without it.

One launch serves every test (~20 s on 2 cores): this file, run under
torchrun with 2 ranks, trains each entry of VARIANTS for STEPS steps in one
process group and writes, per variant, the logged metrics of every step and
what StepProbe saw inside the steps on each rank:

    torchrun --nproc_per_node=2 tests/test_fsdp_gpu_paths.py <out.json> '<overrides as JSON>'
"""
import contextlib
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import launched
import pytest

STEPS = 3
MODEL = ["model.config.num_hidden_layers=2"]   # the micro model with two blocks for checkpointing to save on
# SGD with momentum: an update linear in the gradients (see the bf16 test) that keeps optimizer state
SFT = ["loss=sft", "optimizer=SGD", "lr=0.1", "optimizer.momentum=0.9"]
DPO = ["loss=dpo", "optimizer=AdamW"]
VARIANTS = {
    "sft_fp32": SFT,
    "sft_bf16": [*SFT, "trainer.mixed_precision=bf16"],
    "dpo_fp32": DPO,
    "dpo_bf16": [*DPO, "trainer.mixed_precision=bf16"],
    "dpo_offload": [*DPO, "cpu_offload=true"],
    "dpo_checkpointing": [*DPO, "trainer.activation_checkpointing=true"],
}
MEMORY = ("memory/params_bytes_per_rank", "memory/grads_bytes_per_rank", "memory/optimizer_state_bytes_per_rank",
          "memory/reference_params_bytes_per_rank", "memory/params_bytes", "memory/grads_bytes",
          "memory/optimizer_state_bytes", "memory/reference_params_bytes")


# ---------------------------------------------------------------------------
# The tests (pytest); conftest is imported by them only, as the launched part
# does without it (it registers every optimizer, importing optional packages).

U = 2.0 ** -8   # bf16's unit roundoff: an 8-bit significand (7 stored bits), round to nearest


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """(results by variant, the launch's stderr) of one 2-rank torchrun."""
    from conftest import FAST, MICRO_MODEL, ROOT

    out = tmp_path_factory.mktemp("fsdp_gpu_paths") / "results.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out),
           json.dumps([*FAST, *MICRO_MODEL])]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text()), r.stderr


def column(results, variant, key):
    return [row[key] for row in results[variant]["rows"]]


def runs_with(override: str) -> int:
    return sum(override in overrides for overrides in VARIANTS.values())


def every_rank_max(results, variant, key):
    return max(rank[key] for rank in results[variant]["ranks"])


def every_rank(results, variant, key):
    """`key` of the probe, the same on every rank (asserted)."""
    values = [rank[key] for rank in results[variant]["ranks"]]
    assert all(v == values[0] for v in values), (variant, key, values)
    return values[0]


def test_bf16_compute_matches_fp32_within_bf16_precision(launch):
    """SFT, 3 steps of SGD (lr 0.1, momentum 0.9, clipped at norm 1) from the
    same weights, bf16 compute against fp32 compute: every step's loss, and
    the first step's gradient norm, within RTOL = 2u = 2^-7 = 7.8e-3 of the
    fp32 run's.

    Derivation (first order): bf16 keeps 8 significant bits, so each value
    the bf16 forward and backward produce (the gathered weights, every
    activation) is off by at most u = 2^-8 = 3.9e-3 relative; the matmuls
    accumulate in fp32 and the gradients are reduced in fp32 (reduce_dtype),
    so no error grows with the length of a sum.
    (a) A weight's gradient sums products of a forward activation and a
    backward signal, each rounded: 2u, and the norm of the gradients is off
    by at most their own relative error (triangle inequality): 2u.
    (b) The step-1 loss is the mean of logsumexp(z) - z_target over the
    tokens, in fp32 from bf16 logits z (the head's weight, its input and its
    output each rounded: 3u). A relative error e of the logits moves each
    term by at most 2 max|z| e, so the loss by 2 max|z| / L x e relative:
    near a random init the logits are small and the loss ~ ln 259, so this
    condition number is < 0.5 (asserted; measured 0.35: max|z| = 0.94 from
    the probe, L >= 5.40), and 3u becomes at most 1.5u. (What the blocks'
    inner roundings add reaches the logits with either sign and cancels in
    the mean.)
    (c) Steps 2 and 3 add the drift of the weights: SGD's update is linear in
    the clipped gradients, whose error is at most 2 x 2u (dividing by the norm
    doubles (a)); the fp32 weights' path before step 3 is lr x (|m1| + |m2|)
    <= 0.1 x (1 + 1.9) = 0.29 (momentum buffers of clipped gradients), so the
    bf16 weights are within 4u x 0.29 = 1.2u (L2) and the loss within
    |g| x 1.2u < 2.4u absolute (|g| < 2, asserted; measured <= 1.78), 0.5u
    relative (L > 4.8, asserted). (b) + (c) = 2u = RTOL.
    Measured: loss within 4.5e-6 (step 1), 1.0e-4, 2.1e-4 (<= 3.9e-5
    relative, 0.01 u: worst-case first-order bounds ignore how much of the
    rounding cancels); gradient norm 8.4e-4 relative at step 1 (0.2 u).

    Not vacuous: two fp32 runs in one launch agree bit for bit (the offload
    and checkpointing variants give DPO's fp32 losses exactly), so every
    difference here is bf16's; the largest loss difference must exceed 32
    fp32 ulps of the loss (2^-21 for 4 <= L < 8: 1.5e-5; measured 2.1e-4),
    and step 1's gradient norm must move by more than u/64 relative."""
    results, _ = launch
    fp32, bf16 = (column(results, v, "loss/train") for v in ("sft_fp32", "sft_bf16"))
    norm32, norm16 = (column(results, v, "grad_norm")[0] for v in ("sft_fp32", "sft_bf16"))
    rtol = 2 * U
    logit_max = every_rank_max(results, "sft_fp32", "logit_max")
    assert 2 * logit_max / min(fp32) < 0.5, (logit_max, fp32)   # (b)'s condition number
    assert max(column(results, "sft_fp32", "grad_norm")) < 2 and min(fp32) > 4.8   # (c)'s |g| and L
    for step, (a, b) in enumerate(zip(fp32, bf16), 1):
        assert abs(b - a) <= rtol * abs(a), (step, a, b, abs(b - a))
    assert abs(norm16 - norm32) <= rtol * norm32, (norm32, norm16)
    assert fp32[1] < fp32[0] - 0.05, f"SFT did not train: {fp32}"   # the comparison sees a training run
    ulp = 2.0 ** (math.floor(math.log2(max(fp32))) - 23)
    assert max(abs(b - a) for a, b in zip(fp32, bf16)) > 32 * ulp, ("bf16 compute changed no loss", fp32, bf16)
    assert abs(norm16 - norm32) > U / 64 * norm32, (norm32, norm16)


def test_bf16_gathers_bf16_and_keeps_fp32_master_weights(launch):
    """The parameters FSDP gathers for every module's forward are bf16, and
    exactly half the fp32 run's bytes; the shards, their gradients and the
    momentum buffers stay fp32 (memory/* per rank and in total equal to the
    fp32 run's, byte for byte); FSDP was told fp32 reduction; the activations
    saved for backward shrink (bf16; the fp32 logits of the scored positions
    and int64 indices stay: at most 3/4 of fp32's, measured 0.54-0.57); the
    warning is printed once per run (by rank 0)."""
    from prefopt.distributed.sharding import CPU_BF16_WARNING

    results, stderr = launch
    assert every_rank(results, "sft_bf16", "compute_dtypes")["policy"] == ["bfloat16"]
    assert every_rank(results, "sft_fp32", "compute_dtypes")["policy"] == ["float32"]
    gathered = {v: every_rank(results, v, "gathered_bytes")["policy"] for v in ("sft_fp32", "sft_bf16")}
    assert gathered["sft_bf16"] * 2 == gathered["sft_fp32"] > 0
    # every parameter is gathered: the shards hold those bytes plus FSDP's padding (the 259-row embedding and
    # head are split 130 + 129 rows, the second padded by one row)
    assert gathered["sft_fp32"] <= results["sft_fp32"]["rows"][0]["memory/params_bytes"] < 1.01 * gathered["sft_fp32"]
    for key in ("params", "grads", "optimizer_state"):
        assert every_rank(results, "sft_bf16", key) == ["cpu float32"], key
    assert every_rank(results, "sft_bf16", "param_reduce_dtype") == ["torch.bfloat16 torch.float32"]
    assert every_rank(results, "sft_fp32", "param_reduce_dtype") == ["None None"]
    for fp32, bf16 in zip(results["sft_fp32"]["rows"], results["sft_bf16"]["rows"]):
        assert fp32["memory/optimizer_state_bytes_per_rank"] == fp32["memory/params_bytes_per_rank"] > 0  # momentum
        for key in MEMORY:
            assert bf16[key] == fp32[key], key
    for rank32, rank16 in zip(results["sft_fp32"]["ranks"], results["sft_bf16"]["ranks"]):
        assert rank16["saved_bytes"] <= 0.75 * rank32["saved_bytes"], (rank16["saved_bytes"], rank32["saved_bytes"])
    assert stderr.count(CPU_BF16_WARNING) == runs_with("trainer.mixed_precision=bf16")


def test_bf16_reference_computes_exactly_as_the_policy(launch):
    """DPO's frozen reference is sharded with the same bf16 policy: at step 1
    policy and reference hold the same weights, so the bf16 log-probs cancel
    exactly and the loss is ln 2 as in fp32 (any difference in how the two
    models gather or compute would show here)."""
    results, _ = launch
    assert every_rank(results, "dpo_bf16", "compute_dtypes") == {"policy": ["bfloat16"], "reference": ["bfloat16"]}
    first = results["dpo_bf16"]["rows"][0]
    assert first["loss/train"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards_train/margins"] == 0.0


def assert_same_training(results, variant, baseline="dpo_fp32"):
    """Every step's losses, rewards and gradient norm within 1e-6 of the baseline's."""
    for row, base in zip(results[variant]["rows"], results[baseline]["rows"], strict=True):
        for key in ("loss/train", "rewards_train/chosen", "rewards_train/rejected", "rewards_train/margins",
                    "logps_train/chosen", "grad_norm"):
            assert row[key] == pytest.approx(base[key], abs=1e-6, rel=1e-6), (variant, row["step"], key)
    assert abs(results[baseline]["rows"][-1]["rewards_train/margins"]) > 1e-4, "DPO did not move the policy"


def test_cpu_offload_matches_and_puts_the_shards_and_state_on_cpu(launch):
    """cpu_offload=true under trainer=fsdp: FSDP2's CPUOffloadPolicy on every
    sharded parameter of the policy and of the reference (pin_memory off on
    CPU); the same training as without it, the same bytes per rank, and the
    shards, gradients, AdamW state and reference shards on the CPU device.
    On a CPU run those devices are the CPU with or without offload: what this
    proves is that FSDP ran its offload path (the flags, the equal losses);
    the device assertions bite only on a GPU."""
    results, stderr = launch
    assert_same_training(results, "dpo_offload")
    assert every_rank(results, "dpo_offload", "offload_pin") == [[True, False]]
    assert every_rank(results, "dpo_fp32", "offload_pin") == [[False, False]]
    for key in ("params", "grads", "optimizer_state", "reference_params"):
        assert every_rank(results, "dpo_offload", key) == ["cpu float32"], key
    for row, base in zip(results["dpo_offload"]["rows"], results["dpo_fp32"]["rows"]):
        assert row["memory/optimizer_state_bytes_per_rank"] > row["memory/params_bytes_per_rank"] > 0  # 2 moments
        for key in MEMORY:
            assert row[key] == base[key], key
    assert stderr.count("cpu_offload=true on CPU: FSDP's CPUOffloadPolicy is applied") == runs_with("cpu_offload=true")


def test_activation_checkpointing_recomputes_each_block_and_saves_less(launch):
    """trainer.activation_checkpointing=true: the same training (1e-6); each
    decoder block's forward runs twice per micro-batch (once more in
    backward: one micro-batch of 4 pairs per rank per step, so 2 x 3 calls
    against 3), and autograd keeps less for backward: only the blocks'
    inputs instead of everything inside them (at most half; measured 0.22
    of the 659-667 kB per rank without it)."""
    results, _ = launch
    assert_same_training(results, "dpo_checkpointing")
    assert every_rank(results, "dpo_fp32", "mlp_calls") == STEPS
    assert every_rank(results, "dpo_checkpointing", "mlp_calls") == 2 * STEPS
    for plain, checkpointed in zip(results["dpo_fp32"]["ranks"], results["dpo_checkpointing"]["ranks"]):
        assert checkpointed["saved_bytes"] <= 0.5 * plain["saved_bytes"], (checkpointed, plain)


def test_cpu_gpu_path_refusals_are_one_line(tmp_path):
    """fp16 compute on CPU stays refused (only bf16 is opted into, to test the
    GPU default); cpu_offload under trainer=fsdp on a GPU asks for a process
    group that reduces CPU tensors with gloo next to NCCL (the offloaded
    gradients' global norm), checked on the config alone (no GPU needed)."""
    import torch
    from conftest import make_trainer

    from utils import ConfigError

    with pytest.raises(ConfigError, match="trainer.mixed_precision=fp16 on CPU is refused") as e:
        make_trainer(tmp_path, "trainer=fsdp", "trainer.mixed_precision=fp16", "device=cpu")
    assert "\n" not in str(e.value)
    for offload, on_gpu in (("true", "cuda:nccl,cpu:gloo"), ("false", "nccl")):
        trainer = make_trainer(tmp_path, "trainer=fsdp", f"cpu_offload={offload}", setup=False)
        assert (trainer._backend(torch.device("cuda")), trainer._backend(torch.device("cpu"))) == (on_gpu, "gloo")


# ---------------------------------------------------------------------------
# The launched part (torchrun): probes and the training loop


class StepProbe:
    """What the training steps do inside, seen through module hooks: for the
    policy and the reference, the dtypes and bytes of the parameters each
    module computes with (FSDP's gathered, unsharded ones); the forward calls
    of the policy's first decoder block's MLP (2 per micro-batch when
    activation checkpointing recomputes it in backward); the largest |logit|
    of the policy; and, for the first
    step, the bytes autograd saves for backward (distinct storages, through
    saved_tensors_hooks)."""

    def __init__(self, trainer):
        from prefopt.model_structure import decoder_blocks

        self.gathered = {"policy": {}, "reference": {}}   # role -> {(module, name): (dtype, bytes)}
        self.mlp_calls, self.saved_bytes, self._saved = 0, 0, set()
        self.handles = []
        for role, model in (("policy", trainer.policy), ("reference", trainer.reference)):
            for module in (model.modules() if model is not None else ()):
                if any(True for _ in module.parameters(recurse=False)):
                    self.handles.append(module.register_forward_pre_hook(
                        lambda m, args, role=role: self._gathered(role, m)))
        self.handles.append(decoder_blocks(trainer.policy)[0].mlp.register_forward_pre_hook(self._mlp_called))
        self.logit_max = 0.0
        self.handles.append(trainer.policy.get_output_embeddings().register_forward_hook(self._logits))

    def _gathered(self, role, module):
        for name, p in module.named_parameters(recurse=False):
            self.gathered[role][(id(module), name)] = (str(p.dtype).removeprefix("torch."), p.nbytes)

    def _mlp_called(self, module, args):
        self.mlp_calls += 1

    def _logits(self, module, args, logits):
        self.logit_max = max(self.logit_max, logits.detach().abs().max().item())

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._saved:
            self._saved.add(storage.data_ptr())
            self.saved_bytes += storage.nbytes()
        return t

    def report(self) -> dict:
        for h in self.handles:
            h.remove()
        return {"compute_dtypes": {r: sorted({d for d, _ in g.values()}) for r, g in self.gathered.items()},
                "gathered_bytes": {r: sum(b for _, b in g.values()) for r, g in self.gathered.items()},
                "mlp_calls": self.mlp_calls, "saved_bytes": self.saved_bytes, "logit_max": self.logit_max}


def fsdp_params(model):
    """FSDP2's own record of each sharded parameter (private API: the offload
    policy a module was given is not public)."""
    from torch.distributed.fsdp import FSDPModule

    for module in (model.modules() if model is not None else ()):
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            yield from (group.fsdp_params if group is not None else ())


def placed(tensors) -> list[str]:
    """The distinct 'device dtype' of the local shards of `tensors`."""
    import torch

    from prefopt.distributed.sharding import local

    return sorted({f"{local(t).device.type} {str(local(t).dtype).removeprefix('torch.')}"
                   for t in tensors if isinstance(t, torch.Tensor)})


def where_everything_is(trainer) -> dict:
    """Device and dtype of the policy's shards, their gradients, the optimizer
    state and the reference's shards; FSDP's offload and precision settings."""
    params = list(trainer.policy.parameters())
    both = (trainer.policy, trainer.reference)
    return {"params": placed(params), "grads": placed(p.grad for p in params),
            "optimizer_state": placed(t for state in trainer.optimizer.state.values() for t in state.values()),
            "reference_params": placed(trainer.reference.parameters()) if trainer.reference is not None else [],
            "offload_pin": sorted({(f.offload_to_cpu, f.pin_memory) for m in both for f in fsdp_params(m)}),
            "param_reduce_dtype": sorted({f"{f.mp_policy.param_dtype} {f.mp_policy.reduce_dtype}"
                                          for m in both for f in fsdp_params(m)})}


def run_variant(run_dir: Path, common: list, overrides: list) -> dict:
    """STEPS training steps, each logged as a run logs it (log_window: the
    losses and memory/* reduced over the ranks), probed throughout."""
    import torch
    import torch.distributed as dist

    from prefopt.config_checks import compose
    from trainers import build_trainer

    cfg = compose([*common, *MODEL, f"run_dir={run_dir}", "trainer=fsdp", *overrides])
    trainer = build_trainer(cfg, run_dir)
    trainer.setup()
    probe, rows = StepProbe(trainer), []
    for step in range(STEPS):
        window = defaultdict(list)
        saving = torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t)
        with saving if step == 0 else contextlib.nullcontext():
            trainer.train_step(window)
        rows.append(trainer.log_window(window))
    facts = {**probe.report(), **where_everything_is(trainer)}
    trainer.cleanup()
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, facts)
    return {"rows": rows, "ranks": every_rank}


def main() -> None:
    import torch.distributed as dist

    from prefopt import optim as optimizers

    out, common = Path(sys.argv[1]), json.loads(sys.argv[2])
    optimizers.register_configs(["SGD", "AdamW"])
    dist.init_process_group("gloo")
    results = {name: run_variant(out.parent / name, common, overrides) for name, overrides in VARIANTS.items()}
    launched.finish(out, results)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    launched.quiet_environment()
    main()
