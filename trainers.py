"""Trainers: setup -> train -> cleanup.

`BasicTrainer` is the single-process trainer and holds the whole recipe. A
distributed trainer subclasses it and overrides only the small hooks grouped
under "distributed hooks" (how models are wrapped, how metrics are reduced,
how gradients are clipped and synced, how checkpoints are written); the
training step itself reads the same for every trainer.

Step accounting: `batch_size` examples (preference pairs) make one optimizer
step, processed as `gradient_accumulation_steps` micro-batches.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from preference_datasets import (
    BadRows,
    BatchStream,
    collate,
    collate_prompts,
    drop_identical_pairs,
    get_examples,
    split_overlap_warning,
    tokenize_rows,
    unpaired_rows,
)
from prefopt import adapters, checkpoints, reference_cache, rundir
from prefopt.config_checks import micro_batch_size
from prefopt.data.unpaired import check_kl_batch, with_kl_completions
from prefopt.divergence import DivergenceGuard
from prefopt.losses import SeqLogps, build_loss, gathered_logps, sequence_stats
from prefopt.memory import PeakMemory, keep_cpu_memory, optimizer_state_bytes, tensor_bytes
from prefopt.model_structure import PLAIN_HEAD_MODELS, SHARED_PROMPT_MODELS
from prefopt.models import build_model, build_tokenizer
from prefopt.optim import build_optimizer, build_scheduler
from prefopt.sparsity import UpdateSparsity
from utils import (
    ConfigError,
    MetricsLogger,
    TrainingError,
    atomic_directory,
    atomic_write_text,
    disk_full_message,
    resolve_device,
    resolve_dtype,
    set_seed,
)


class BasicTrainer:
    world_size = 1
    rank = 0

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.step = 0          # optimizer steps taken
        self.examples = 0      # training pairs consumed
        self.tokens = 0        # training tokens consumed (non-padding, all ranks), counted at each log step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self._setup_distributed()
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and cfg.get("keep_cpu_memory", False):
            keep_cpu_memory()
        self.dtype = resolve_dtype(cfg.precision, self.device)
        self.loss = build_loss(cfg.loss)
        self.adapters = adapters.enabled(cfg)   # peft=lora/dora
        set_seed(cfg.seed)
        self._load_rows()          # before the tokenizer and model: bad data fails in a second
        self.tokenizer = build_tokenizer(cfg.model)
        self._setup_data()
        self.policy = self._setup_policy()
        self.share_prompt = self._share_prompt()
        cached = self._read_reference_cache()   # loss.precompute_reference: an earlier run's, from disk
        self.reference = None if cached else self._setup_reference()
        self.offloaded_reference = self.reference is not None and self._reference_offloaded()
        if self.offloaded_reference:
            self.reference.to("cpu")
        # with adapters the reference is the policy with its adapters disabled (no copy)
        self.adapter_reference = self.adapters and self.loss.needs_reference and not cached
        self._setup_fast_paths()   # compile=true, loss.precompute_reference=true
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.warmup_steps, cfg.max_steps)
        self.memory = PeakMemory(self.device)
        self.window = defaultdict(list)   # train metrics since the last log, kept on the device
        self.divergence = DivergenceGuard(cfg.get("divergence") or {})
        if cfg.resume:
            self.load_checkpoint(checkpoints.find_resumable(self.run_dir, self.print))
        if self.divergence.enabled and self.divergence.start_norm is None:
            self.divergence.check_norm(self.parameter_norm())   # the reference: the weights the run starts from
        self.logger = self._setup_logger() if self.is_main else None
        # None unless metrics.update_sparsity
        self.sparsity = UpdateSparsity.from_config(cfg, self._unwrapped(self.policy))

    def _load_rows(self) -> None:
        cfg = self.cfg
        bad_rows = BadRows(skip=cfg.data.skip_bad_rows)
        self.train_rows = get_examples(cfg.dataset, "train", bad_rows)
        self.eval_rows = get_examples(cfg.dataset, "eval", bad_rows)[: cfg.n_eval_examples]
        if bad_rows.count:
            self.print(f"skipped {bad_rows.count} malformed rows (data.skip_bad_rows=true); first: {bad_rows.first}")
        if self.loss.data != "unpaired":   # unpaired rows, or data.unpaired=true, are an error here
            unpaired_rows(self.train_rows, cfg.data.get("unpaired", "auto"), False, self.loss.name)
        if self.loss.data == "pairs" and any(r.rejected is None for r in self.train_rows):
            raise ConfigError(f"loss={self.loss.name} needs a 'rejected' response in every row of "
                              f"dataset={cfg.dataset.name}")
        overlap = split_overlap_warning(self.train_rows, self.eval_rows)
        if overlap:
            self.print(overlap)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.micro_batch_size = micro_batch_size(cfg, self.world_size)
        if self.loss.data == "unpaired":
            check_kl_batch(self.micro_batch_size)

        train = tokenize_rows(self.train_rows, self.tokenizer, cfg)   # chat template, data.add_bos, truncation
        self.eval_examples = tokenize_rows(self.eval_rows, self.tokenizer, cfg)
        self.generation_examples = self.eval_examples   # one per eval row, even when KTO splits the pairs
        if self.loss.two_sequences:
            train, warning = drop_identical_pairs(train, self.eval_examples, cfg.max_length)
            if warning:
                self.print(warning)
        if self.loss.data == "unpaired":   # KTO: pairs split after identical ones are dropped (their halves cancel)
            mode = cfg.data.get("unpaired", "auto")
            train, message = unpaired_rows(train, mode, True, self.loss.name)
            self.eval_examples, _ = unpaired_rows(self.eval_examples, mode, True, self.loss.name)
            if message:
                self.print(message)
        # Each rank reads its own slice of every global batch.
        self.train_stream = BatchStream(train, cfg.batch_size, cfg.seed)

    def _setup_policy(self) -> torch.nn.Module:
        policy = build_model(self.cfg.model, self.tokenizer, self.dtype, self.device)
        if self.adapters:
            self.base_sha256 = adapters.base_digest(policy)   # recorded in checkpoints (model.archive checks it)
            policy = adapters.add_adapters(policy, self.cfg.peft, self.device)
        return self._wrap(policy)

    def _setup_reference(self) -> torch.nn.Module | None:
        """A frozen copy of the starting policy (the SFT model when
        model.archive points at an SFT run), as in the DPO paper; none with
        adapters (the base model is the reference)."""
        if not self.loss.needs_reference:
            return None
        if self.adapters:
            if self.loss.options.get("sync_ref_model"):
                raise ConfigError(f"loss.sync_ref_model=true needs a reference model of its own; with "
                                  f"peft={self.cfg.peft.name} the reference is the base model, which cannot move")
            return None
        return self._frozen_copy(self.policy)

    def _reference_offloaded(self) -> bool:
        """reference.offload=true (OpenRLHF's --ref.offload): the frozen
        reference lives in CPU memory and visits the GPU for its forward only.
        GPU-only code (CUDA; not run on a GPU yet): on a CPU run it does nothing."""
        if not (self.cfg.get("reference") or {}).get("offload", False):
            return False
        if self.device.type == "cpu":
            self.print("reference.offload=true does nothing here: the reference is already in CPU memory")
            return False
        return True

    def _read_reference_cache(self) -> bool:
        """With loss.precompute_reference and reference_cache_dir: the reference
        log-probs of every pair from the cache (reference_cache.py), put on the
        examples. True on a hit: then no reference model is built at all."""
        self._cache_entry, self.reference_cache_state = None, None   # None | "hit" | "miss" (for bench.py)
        cache_dir = self.cfg.get("reference_cache_dir")
        if not (self.loss.needs_reference and self.cfg.loss.get("precompute_reference", False) and cache_dir):
            return False
        examples = self.train_stream.examples + self.eval_examples
        settings = {"share_prompt": self.share_prompt, "dtype": str(self.dtype), "device": self.device.type,
                    "ld_alpha": self.loss.ld_alpha, "world_size": self.world_size}
        key = reference_cache.cache_key(self.weights_digest(self.policy), examples, settings)
        self._cache_entry = reference_cache.entry_path(cache_dir, key)
        logps, problem = reference_cache.read(self._cache_entry, len(examples))
        if problem:
            self.print(f"warning: reference cache entry {self._cache_entry} is damaged ({problem}); recomputing it")
        self.reference_cache_state = "hit" if self.all_ranks(logps is not None) else "miss"
        if self.reference_cache_state == "miss":
            return False
        for ex, (chosen, rejected) in zip(examples, logps.tolist()):
            ex.reference_logps = (chosen, rejected)
        self.print(f"reference log-probs of {len(examples)} pairs read from {self._cache_entry}: no reference model "
                   "is built")
        return True

    def weights_digest(self, model: torch.nn.Module) -> str:
        """SHA-256 of the starting weights the reference is made of (with peft:
        the base, hashed once before the adapters were added)."""
        return self.base_sha256 if self.adapters else adapters.base_digest(self._unwrapped(model))

    def _share_prompt(self) -> bool:
        """share_prompt=true (the default) puts each pair in one row, the prompt
        once (see preference_datasets.collate). It relies on the model honouring
        a 4-D boolean attention mask (SDPA) and explicit position ids, verified
        for SHARED_PROMPT_MODELS."""
        if not (self.cfg.get("share_prompt", False) and self.loss.two_sequences):
            return False
        config = self._unwrapped(self.policy).config
        model_type, attention = getattr(config, "model_type", None), getattr(config, "_attn_implementation", None)
        if model_type not in SHARED_PROMPT_MODELS or attention != "sdpa":
            self.print(f"share_prompt: not verified for model_type={model_type} with attention={attention}; "
                       "chosen and rejected go in separate rows")
            return False
        return True

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        if self.loss.data != "unpaired":
            return collate(examples, self.tokenizer.pad_token_id, self.loss.two_sequences, self.share_prompt)
        batch = collate(with_kl_completions(examples, self.cfg.max_length), self.tokenizer.pad_token_id, True,
                        self.share_prompt)
        batch["desirable"] = torch.tensor([ex.label for ex in examples])
        return batch

    def _offload_device(self) -> str | None:
        if not self.cfg.cpu_offload:
            return None
        if self.device.type == "cpu":
            self.print("cpu_offload=true does nothing here: parameters and optimizer state are already in CPU memory")
            return None
        return "cpu"

    def optimizer_mode(self, mode: str) -> None:
        """Schedule-free optimizers keep two weight sequences and switch with
        optimizer.train()/.eval(): train for steps, eval for evaluation and
        checkpoints. Other optimizers have no such methods."""
        switch = getattr(self.optimizer, mode, None)
        if callable(switch):
            switch()

    def _setup_logger(self) -> MetricsLogger:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", rundir.config_yaml_text(cfg, self.run_dir))
        return MetricsLogger(self.run_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True), cfg.wandb.name)

    # ------------------------------------------------------ distributed hooks
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_distributed(self) -> None:
        pass

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def _unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def _frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen, wrapped copy of the wrapped `model` (the reference); a
        sharded trainer copies its shards instead of the whole model."""
        return self._wrap(copy.deepcopy(self._unwrapped(model)).eval().requires_grad_(False))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the wrapped policy, from the registry."""
        cfg = self.cfg
        return build_optimizer(self.policy, cfg.optimizer.name, OmegaConf.to_container(cfg.optimizer),
                               cfg.lr, self.device, cfg.decay_embeddings, {"max_steps": cfg.max_steps},
                               offload_to=self._offload_device())

    def stop_requested(self, stop: "StopOnSignal") -> bool:
        """Stop after this step (SIGTERM/SIGINT)? A distributed trainer decides
        for all ranks together, so that they stop at the same step."""
        return bool(stop.requested)

    def all_ranks(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (one process: `flag`)."""
        return flag

    def sum_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value summed over the ranks; identity on one process. Means
        are made from sums and counts reduced this way (`mean_over_ranks`),
        never as a mean of per-rank means, which is wrong whenever ranks
        averaged different numbers of examples."""
        return values

    def mean_over_ranks(self, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, float]:
        """{name: sum over ranks of sums[name] / sum over ranks of counts[name]}."""
        totals = self.sum_over_ranks({**sums, **{f"{k}\0count": counts[k] for k in sums}})
        return {k: (totals[k] / totals[f"{k}\0count"]).item() for k in sums}

    def gradient_sync(self, last_micro_batch: bool):
        """Context for one micro-batch's backward; a distributed trainer skips
        the gradient reduce on all but the last micro-batch."""
        return contextlib.nullcontext()

    def clip_grad_norm(self) -> torch.Tensor:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def global_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of all `tensors` together (a sharded trainer sums over ranks)."""
        if not tensors:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.detach() for t in tensors])).float())

    def memory_metrics(self) -> dict[str, int]:
        """`memory/*` of this process's live tensors (exact bytes, each storage
        once; a sharded tensor counts its local shard), reduced over ranks."""
        params = list(self.policy.parameters())
        state_total, state_by_name = optimizer_state_bytes(self.optimizer)
        reference = [p for p in (self.reference.parameters() if self.reference is not None else [])
                     if p.device.type == self.device.type]   # bytes on the training device (none when offloaded)
        mine = {"params": tensor_bytes(params), "params_trainable": tensor_bytes(p for p in params if p.requires_grad),
                "grads": tensor_bytes(p.grad for p in params),
                "optimizer_state": state_total, "reference_params": tensor_bytes(reference), "peak": self.memory.read()}
        mine.update({f"optimizer_state/{k}": v for k, v in state_by_name.items()})
        return self.reduce_memory(mine)

    def reduce_memory(self, mine: dict[str, int]) -> dict[str, int]:
        """{name: bytes} of this process -> `memory/<name>_bytes` metrics."""
        return {f"memory/{k}_bytes": v for k, v in mine.items()}

    def save_model(self, directory: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one progress bar (ours) is enough
        policy = self._unwrapped(self.policy)
        policy.save_pretrained(directory, safe_serialization=True)   # with adapters: PEFT's adapter files
        self.tokenizer.save_pretrained(directory)
        if self.adapters and (self.cfg.get("export") or {}).get("merged") and self.step == self.cfg.max_steps:
            adapters.save_merged(policy, self.tokenizer, directory / "merged")

    # ------------------------------------------------------------ the math
    def batch_metrics(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict]:
        """Loss and metrics of one micro-batch. For preference losses one forward
        pass serves chosen and rejected: its log-probs are the B chosen
        sequences then the B rejected ones, whatever the layout (collate)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        policy = self.forward_logps(self.policy, batch, with_wpo=self.loss.use_weighting)
        reference = self.reference_logps(batch) if self.loss.two_sequences else None
        out = self.loss(policy, reference, batch.get("desirable"))
        return out.loss, {split_metric(name, split): v for name, v in out.metrics.items()}

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Precomputed ones from the batch (loss.precompute_reference=true), else
        a forward of the frozen reference; zeros when reference-free. LD-DPO
        weighted when loss.ld_alpha is set, as the policy's."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.adapter_reference:
            with adapters.disabled(self._unwrapped(self.policy)):
                return self.forward_logps(self.policy, batch).scored
        if self.reference is None:
            return torch.zeros(batch["n_scored"].shape[0], device=self.device)  # one per sequence, whatever the layout
        if self.offloaded_reference:   # GPU only: in for its forward, back out after (never run on a GPU yet)
            self.reference.to(self.device)
            try:
                return self.forward_logps(self.reference, batch).scored
            finally:
                self.reference.to("cpu")
        return self.forward_logps(self.reference, batch).scored

    def forward_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_wpo: bool = False
                      ) -> SeqLogps:
        """Per-sequence summed log-probs of the labelled tokens and their count
        (plus what loss.ld_alpha and loss.use_weighting need). use_cache=False:
        a training forward builds no KV cache. With compile=true the model and
        the token log-probs run as one torch.compile'd graph."""
        fn = self._compiled.get(id(model)) or functools.partial(_token_logps, model)
        token_logps, log_sum_sq = fn(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                                     batch["score_rows"], batch["score_targets"], with_wpo)
        return sequence_stats(token_logps, batch["score_seq"], batch["n_scored"], ld_alpha=self.loss.ld_alpha,
                              log_sum_sq=log_sum_sq)

    def _setup_fast_paths(self) -> None:
        self._compiled = {}
        if (self.reference is not None or self.adapter_reference) and self.cfg.loss.get("precompute_reference", False):
            self.precompute_reference()
        if self.cfg.get("compile", False):
            for model in (self.policy, self.reference):
                if model is not None:
                    self._compiled[id(model)] = torch.compile(functools.partial(_token_logps, model))

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """The frozen reference's log-probs of every train and eval pair, once,
        before training; they ride on the examples (collate puts them in the
        batch), and the reference model is freed: no reference forward during
        training. Like TRL's precompute_ref_log_probs."""
        t0 = time.perf_counter()
        examples = self.train_stream.examples + self.eval_examples
        size = self.cfg.eval_batch_size
        for i in range(0, len(examples), size):
            chunk = examples[i:i + size]
            batch = self.collate(chunk)
            logps = self.reference_logps({k: v.to(self.device) for k, v in batch.items()}).float().cpu().tolist()
            for ex, chosen, rejected in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                ex.reference_logps = (chosen, rejected)
        self.reference, self.adapter_reference = None, False
        if self._cache_entry is not None and self.is_main:
            reference_cache.write(self._cache_entry, torch.tensor([ex.reference_logps for ex in examples]),
                                  {"pairs": len(examples), "written_by": self.run_dir})
        self.print(f"reference log-probs of {len(examples)} pairs precomputed in {time.perf_counter() - t0:.1f}s")

    def micro_batches(self, examples: list) -> list[dict[str, torch.Tensor]]:
        size = self.micro_batch_size
        mine = examples[self.rank * len(examples) // self.world_size:(self.rank + 1) * len(examples) // self.world_size]
        return [self.collate(mine[i:i + size]) for i in range(0, len(mine), size)]

    # ------------------------------------------------------------ training
    def train_step(self, window: dict) -> None:
        """One optimizer step over `batch_size` pairs. Metrics stay on the
        device in `window` until the next log step: no per-step host sync."""
        start = time.perf_counter()
        self.policy.train()
        self.optimizer_mode("train")
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.micro_batches(self.train_stream.next_examples())
        for i, batch in enumerate(micro):
            with self.gradient_sync(last_micro_batch=i == len(micro) - 1):
                loss, metrics = self.batch_metrics(batch, "train")
                (loss / len(micro)).backward()
            for k, v in metrics.items():
                window[k].append(v)
            window["_tokens"].append(batch["lengths"].sum())
        grad_norm = self.clip_grad_norm()
        window["grad_norm"].append(grad_norm)
        window["lr"].append(torch.tensor(self.scheduler.get_last_lr()[0]))
        if torch.isfinite(grad_norm):  # the one host sync per step: a NaN must never reach the weights
            self.optimizer.step()
        else:
            self.handle_nonfinite(grad_norm)
        self.scheduler.step()
        self.step += 1
        self.examples += self.cfg.batch_size
        if self.syncs_reference and self.step % self.loss.options["ref_model_sync_steps"] == 0:
            self.sync_reference()
        window["_seconds"].append(time.perf_counter() - start)

    @property
    def syncs_reference(self) -> bool:
        return bool(self.loss.options.get("sync_ref_model")) and self.reference is not None

    @torch.no_grad()
    def sync_reference(self) -> None:
        """TR-DPO (Gorbatovski et al., 2024, arXiv:2404.09656), TRL's
        sync_ref_model: ref <- alpha * policy + (1 - alpha) * ref every
        loss.ref_model_sync_steps optimizer steps. Elementwise, so a sharded
        trainer mixes its own shards; checkpoints then carry the reference."""
        alpha = self.loss.options["ref_model_mixup_alpha"]
        for ref, policy in zip(self.reference.parameters(), self.policy.parameters(), strict=True):
            ref.mul_(1.0 - alpha).add_(policy, alpha=alpha)

    def handle_nonfinite(self, grad_norm: torch.Tensor) -> None:
        """nonfinite=stop: raise, leaving the weights and the last checkpoint
        untouched; nonfinite=skip: drop this update and count it."""
        if self.cfg.nonfinite == "skip":
            self.window["skipped_steps"].append(torch.tensor(1.0))
            self.print(f"warning: non-finite gradient norm at step {self.step + 1}: update skipped (nonfinite=skip)")
            return
        raise TrainingError(f"non-finite loss or gradient norm ({grad_norm.item()}) at step {self.step + 1}; "
                            f"the weights were not updated and {self.last_checkpoint()}. Lower lr, add warmup_steps, "
                            "or set nonfinite=skip")

    def last_checkpoint(self) -> str:
        latest = checkpoints.latest_name(self.run_dir)
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"

    def parameter_norm(self) -> float:
        return self.global_norm(list(self.policy.parameters())).item()

    def watch_divergence(self, loss: float | None = None) -> None:
        """The divergence guard (divergence.py): at each log step and before
        each checkpoint. Stops before a destroyed model is saved."""
        if not self.divergence.enabled:
            return
        problem = self.divergence.check_norm(self.parameter_norm())
        if problem is None and loss is not None:
            problem = self.divergence.check_loss(loss)
        if problem is None:
            return
        if self.divergence.action == "warn":
            self.print(f"warning: training looks diverged at step {self.step}: {problem}")
            return
        raise TrainingError(f"training diverged at step {self.step}: {problem}; no checkpoint was written from these "
                            f"weights and {self.last_checkpoint()}. Lower lr, add warmup_steps, or set "
                            "divergence.action=warn")

    def train(self) -> None:
        progress = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        try:
            if self.step == 0:
                self.evaluate()
            with StopOnSignal() as stop:
                while self.step < self.cfg.max_steps and not self.stop_requested(stop):
                    self.train_step(self.window)
                    progress.update(1)
                    self.on_step_end(progress)
                if self.stop_requested(stop) and self.step < self.cfg.max_steps:
                    self.save_checkpoint()
                    self.print(f"stopped by {stop.requested} at step {self.step}; checkpoint saved. Resume with: "
                               f"{rundir.resume_command(self.run_dir)}")
        finally:
            progress.close()

    def on_step_end(self, progress) -> None:
        """Log, evaluate and save, each on its own schedule (and all at the end)."""
        cfg, last = self.cfg, self.step == self.cfg.max_steps
        if self.step % cfg.log_every == 0 or last:
            logged = self.log_window(self.window)
            progress.set_postfix({k.split("/")[0]: f"{v:.3g}" for k, v in logged.items()
                                  if k in ("loss/train", "rewards_train/accuracies")})
            self.window = defaultdict(list)
        if self.step % cfg.eval_every == 0 or last:
            self.evaluate()
        if (cfg.save_every and self.step % cfg.save_every == 0) or last:
            self.save_checkpoint()

    def log_window(self, window: dict) -> dict:
        train_time = sum(window.pop("_seconds"))
        # Means over the window's micro-batches of every rank (all of one size:
        # batch_size / (gradient_accumulation_steps * world)); a NaN (nothing
        # to average in that micro-batch, e.g. KTO's desirable rewards) is left out.
        # tokens in float64: exact to 2^53 (float32 would round a window's sum above 2^24 = 16.8M tokens)
        sums, counts = {"_tokens": torch.stack(window.pop("_tokens")).sum().double()}, {}
        for k, v in window.items():
            v = torch.stack(v).float()
            present = ~v.isnan()
            sums[k], counts[k] = torch.where(present, v, 0.0).sum(), present.sum()
        counts["_tokens"] = torch.ones((), dtype=torch.int64, device=sums["_tokens"].device)
        means = self.mean_over_ranks(sums, counts)
        tokens = means.pop("_tokens") * self.world_size   # each rank counted once: the sum over ranks
        self.tokens += round(tokens)
        metrics = {"step": self.step, "examples": self.examples, "tokens": self.tokens, **means,
                   "tokens_per_s": tokens / max(train_time, 1e-9), **self.memory_metrics()}
        if self.sparsity is not None:
            metrics.update(self.sparsity.measure())   # since the last log step, then restart the window
        if self.is_main:
            self.logger.log(metrics)
        self.watch_divergence(metrics.get("loss/train"))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.policy.eval()
        self.optimizer_mode("eval")
        sums, counts = defaultdict(float), defaultdict(int)
        for mine, weight in self.eval_shards(self.eval_examples, self.cfg.eval_batch_size):
            _, metrics = self.batch_metrics(self.collate(mine), "eval")
            for k, v in metrics.items():   # NaN: nothing to average in this batch (KTO without desirable rows)
                present = ~v.isnan()        # kept on the device: no host sync per metric
                sums[k] += torch.where(present, v, 0.0) * weight
                counts[k] += present * weight
        if self.cfg.dataset.get("verifiable") and self.cfg.n_eval_generations:
            correct, decoded = self.generation_accuracy()
            sums["generate_eval/accuracy"] = torch.tensor(correct, dtype=torch.float64)
            counts["generate_eval/accuracy"] = torch.tensor(decoded, dtype=torch.float64)
        metrics = self.mean_over_ranks({k: torch.as_tensor(v, device=self.device) for k, v in sums.items()},
                                       {k: torch.as_tensor(v, device=self.device) for k, v in counts.items()})
        if self.is_main:
            self.logger.log({"step": self.step, "examples": self.examples, **metrics})
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                              if k in ("loss/eval", "rewards_eval/accuracies", "rewards_eval/margins",
                                       "generate_eval/accuracy"))
            tqdm.write(f"eval @ step {self.step}: {shown}")
        return metrics

    def eval_shards(self, examples: list, batch_size: int):
        """This rank's share of each evaluation batch, with its weight (the
        number of examples it really holds). Ranks take turns through every
        global batch of batch_size x world examples; a rank left without an
        example in the last one runs a copy of the batch's first example with
        weight 0, because a sharded model's forward is a collective: every
        rank must run the same number of them."""
        size = batch_size * self.world_size
        for i in range(0, len(examples), size):
            chunk = examples[i:i + size]
            mine = chunk[self.rank::self.world_size]
            yield (mine, len(mine)) if mine else (chunk[:1], 0)

    @torch.no_grad()
    def generation_accuracy(self) -> tuple[int, int]:
        """Greedy decoding on held-out prompts; exact match with the chosen
        answer (the bundled task is verifiable: chosen is the right answer).
        Returns (correct, decoded) for this rank: one generate() call per rank
        (a collective when sharded), all prompts at once."""
        n = min(self.cfg.n_eval_generations, len(self.eval_rows))
        ((mine, weight),) = self.eval_shards(list(zip(self.eval_rows[:n], self.generation_examples[:n])), n)
        rows, examples = zip(*mine)
        batch = collate_prompts([ex.prompt for ex in examples], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        max_new = max(len(ex.chosen) for ex in examples)
        out = self._unwrapped(self.policy).generate(
            **batch, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id)
        answers = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct = sum(a.strip() == r.chosen.strip() for a, r in zip(answers, rows)) if weight else 0
        return correct, weight

    # ------------------------------------------------------------ checkpoints
    def training_state(self) -> dict:
        """Everything besides the weights that an exact resume needs (with
        TR-DPO, the moving reference too)."""
        reference = {"reference": self.reference.state_dict()} if self.syncs_reference else {}
        return {"optimizer": self.optimizer.state_dict(), **reference, **self.progress_state()}

    def load_training_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.syncs_reference:
            self.reference.load_state_dict(state["reference"])
        self.load_progress_state(state)

    def progress_state(self) -> dict:
        """Where the run is: schedule, counters, data position, RNG and the
        partly filled log window (shared by every trainer's checkpoints)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "examples": self.examples,
            "tokens": self.tokens,
            "data": self.train_stream.state(),
            "rng": checkpoints.rng_state(),
            "divergence": self.divergence.state(),
            "window": {k: [torch.as_tensor(t).detach().cpu() for t in v] for k, v in self.window.items()},
        }

    def load_progress_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples = state["step"], state["examples"]
        self.tokens = state.get("tokens", 0)   # absent in checkpoints written before it was counted
        self.train_stream.load_state(state["data"])
        checkpoints.set_rng_state(state["rng"])
        if "divergence" in state:   # absent in checkpoints written before the guard existed
            self.divergence.load_state(state["divergence"])
        self.window = defaultdict(list, {k: [t.item() if k == "_seconds" else t.to(self.device) for t in v]
                                         for k, v in state["window"].items()})

    def save_checkpoint(self) -> Path:
        """<run_dir>/checkpoints/step-<n>/, written whole or not at all: the
        folder is recorded in the run's manifest, written under a temporary
        name, fsynced and renamed; LATEST is replaced atomically after, then
        old checkpoints of this run are pruned. A full disk is one line."""
        self.optimizer_mode("eval")   # schedule-free: the averaged weights are the model to export
        self.watch_divergence()       # never save a destroyed model
        final = checkpoints.checkpoint_root(self.run_dir) / f"step-{self.step}"
        if self.is_main:
            checkpoints.begin_save(self.run_dir, self.step)
        try:
            self.write_checkpoint(final)
        except ConfigError:
            raise
        except Exception as e:
            self._report_full_disk(e, f"checkpoint {final.name}")
            raise
        if self.is_main:
            checkpoints.finish_save(self.run_dir, final, self.cfg.keep_last)
        return final

    def write_checkpoint(self, final: Path) -> None:
        """The files of one checkpoint: the Hugging Face export plus the training state."""
        if self.is_main:
            with atomic_directory(final) as tmp:
                self.save_model(tmp)
                torch.save(self.training_state(), tmp / checkpoints.STATE_FILE)
                self.write_run_record(tmp)

    def write_run_record(self, directory: Path) -> None:
        """What a person (and a resume's config check) reads in a checkpoint:
        where the run was, and the config it ran with."""
        base = {"base_sha256": self.base_sha256} if self.adapters else {}
        atomic_write_text(directory / "prefopt_state.json", json.dumps(
            {"step": self.step, "examples": self.examples, "world_size": self.world_size, **base}))
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        atomic_write_text(directory / checkpoints.CONFIG_FILE, OmegaConf.to_yaml(resolved))

    def _report_full_disk(self, error: Exception, what: str) -> None:
        """Turn a write that failed for lack of space into one line (exit 3)."""
        previous = checkpoints.list_checkpoints(self.run_dir)
        if previous:   # about as much as the last one
            needed = sum(f.stat().st_size for f in previous[0].rglob("*") if f.is_file())
        else:
            needed = tensor_bytes(self.policy.parameters()) + optimizer_state_bytes(self.optimizer)[0]
        message = disk_full_message(error, self.run_dir, what, needed)
        if message:
            raise TrainingError(f"{message}; {self.last_checkpoint()} (intact). Free some space, then resume with: "
                                f"{rundir.resume_command(self.run_dir)}") from None

    def load_checkpoint(self, ckpt: Path) -> None:
        """Resume: weights and optimizer, then schedule, counters, RNG and data
        position; metrics.jsonl is cut back to the checkpoint's step."""
        self.load_weights_and_state(ckpt)
        if self.step > self.cfg.max_steps:
            raise ConfigError(f"{ckpt} is at step {self.step}, past max_steps={self.cfg.max_steps}; resume with "
                              f"max_steps >= {self.step}")
        if self.is_main:
            checkpoints.truncate_metrics(self.run_dir / "metrics.jsonl", self.step, self.print)
        ranks = f" ({self.world_size} ranks)" if self.world_size > 1 else ""
        self.print(f"resumed from {ckpt} at step {self.step}{ranks}")

    def load_weights_and_state(self, ckpt: Path) -> None:
        """Weights into the policy (the reference stays the starting model),
        then the training state."""
        policy = self._unwrapped(self.policy)
        if self.adapters:
            adapters.load_adapter_weights(policy, ckpt)
            self.load_training_state(checkpoints.load_state_file(ckpt))
            return
        weights = checkpoints.load_model_weights(ckpt)
        missing, unexpected = policy.load_state_dict(weights, strict=False)
        tied = {k for k in missing if policy.config.tie_word_embeddings and "lm_head" in k}
        if unexpected or set(missing) - tied:
            raise ConfigError(f"checkpoint {ckpt} does not match the configured model "
                              f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
        self.load_training_state(checkpoints.load_state_file(ckpt))

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _token_logps(model: torch.nn.Module, input_ids, attention_mask, position_ids, rows, targets,
                 with_sum_sq: bool = False):
    """Log-probs of the scored tokens (see collate), and log sum_v p_v^2 at
    each of them when `with_sum_sq` (WPO)."""
    model = adapters.base_model(model)   # a PEFT model's own forward would run the whole LM (head included)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS:
        hidden = model.base_model(**inputs).last_hidden_state
        return gathered_logps(hidden, model.get_output_embeddings(), rows, targets, with_sum_sq)
    return gathered_logps(model(**inputs).logits, None, rows, targets, with_sum_sq)


def split_metric(name: str, split: str) -> str:
    """A loss metric's name in metrics.jsonl: loss -> loss/train,
    loss/dpo -> loss/train/dpo, rewards/chosen -> rewards_train/chosen,
    kl -> kl/train."""
    head, _, rest = name.partition("/")
    if head == "loss" or not rest:
        return f"{head}/{split}" + (f"/{rest}" if rest else "")
    return f"{head}_{split}/{rest}"


class StopOnSignal:
    """SIGTERM/SIGINT ask the loop to stop after the current step (it then
    saves a checkpoint and exits 0); a second signal exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = None
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            print("\nsecond signal: exiting now without a checkpoint", file=sys.stderr)
            raise SystemExit(130)
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step, then saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


# name -> "module:Class", imported on use, so that trainer=basic never loads
# the torch.distributed machinery of the others.
TRAINERS = {"basic": "trainers:BasicTrainer", "fsdp": "prefopt.distributed.fsdp:FSDPTrainer"}


def build_trainer(cfg, run_dir) -> BasicTrainer:
    import importlib

    name = cfg.trainer.name
    if name not in TRAINERS:
        raise ConfigError(f"trainer={name} is unknown; choose one of {', '.join(TRAINERS)}")
    module, cls = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, run_dir)
