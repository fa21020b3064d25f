"""Memory, exactly, and the memory planner.

accounting  bytes of live tensors (each storage once), peak memory, the CPU
            allocator setting: every trainer's `memory/*` metrics
planner     `plan_only=true`: the run's model and optimizer on the meta device,
            exact per-rank bytes (FSDP2's layout: layout.py; optimizer state:
            state.py; model sources: sources.py) and estimated activations
            (activations.py)
fit         `plan.gpu_memory=80GiB`: the settings that fit, best first
settings    the plan.* keys
"""
from prefopt.memory.accounting import PeakMemory, keep_cpu_memory, optimizer_state_bytes, tensor_bytes
from prefopt.memory.activations import activation_bytes
from prefopt.memory.planner import format_table, plan, run
from prefopt.memory.sources import build_meta_model
from prefopt.memory.state import STATE_FORMULAS

__all__ = ["STATE_FORMULAS", "PeakMemory", "activation_bytes", "build_meta_model", "format_table",
           "keep_cpu_memory", "optimizer_state_bytes", "plan", "run", "tensor_bytes"]
