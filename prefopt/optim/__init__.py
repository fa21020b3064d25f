"""Optimizers: the registry (`optimizer=<name>` -> an optimizer and its config
node), wrappers (Muon + AdamW, CPU offload), LR schedules, parameter roles and
groups, our Adam-mini, and the adapter that runs a block-structured optimizer
on FSDP shards. The names below are the registry's public interface."""
from prefopt.optim.param_roles import parameter_groups
from prefopt.optim.registry import (
                                    BLOCKWISE,
                                    ELEMENTWISE,
                                    OptimizerEntry,
                                    build_optimizer,
                                    config_kinds,
                                    find_entry,
                                    fsdp_supported,
                                    get_entry,
                                    keyword_kinds,
                                    optimizer_kwargs,
                                    register_configs,
                                    registry,
                                    signature_defaults,
                                    unknown_name_message,
)
from prefopt.optim.schedules import SCHEDULES, build_scheduler, lr_multiplier
from prefopt.optim.wrappers import OffloadedOptimizer, OptimizerPair, build_muon

__all__ = ["BLOCKWISE", "ELEMENTWISE", "SCHEDULES", "OffloadedOptimizer", "OptimizerEntry", "OptimizerPair",
           "build_muon", "build_optimizer", "build_scheduler", "config_kinds", "find_entry", "fsdp_supported",
           "get_entry", "keyword_kinds", "lr_multiplier", "optimizer_kwargs", "parameter_groups", "register_configs",
           "registry", "signature_defaults", "unknown_name_message"]
