"""More than one process: the FSDP2 trainer (fsdp.py), how models are sharded
(sharding.py), how processes are started (launch.py), and sharded checkpoints
loaded without unrestricted pickle (safe_dcp.py)."""
