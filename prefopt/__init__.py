"""prefopt: preference alignment (SFT and the DPO family) with the optimizer as a measured choice.

The recipe is at the top level (train.py, trainers.py, preference_datasets.py);
this package holds its parts, one concern per module or folder:

  data/          preference rows, one file per source format
  optim/         the optimizer registry, wrappers, schedules, parameter roles, Adam-mini
  distributed/   the FSDP2 trainer, sharding, process launch, safe sharded checkpoints
  losses.py      the loss registry (SFT and the DPO family)
  models.py      models and tokenizers from config, checkpoints or GGUF
  model_structure.py  decoder blocks and head of a causal LM, found from its structure
  memory.py      exact byte accounting of live tensors, and the memory planner
  checkpoints.py checkpoint files; rundir.py: who owns a run directory
  config_checks.py  the command line and the config, checked before anything runs
  divergence.py, sparsity.py, sweeps.py  the divergence guard, update sparsity, multirun tags
"""
