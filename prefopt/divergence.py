"""The divergence guard: a run whose numbers are finite but destroyed.

The non-finite check (trainers.BasicTrainer.handle_nonfinite) stops a run at
the first NaN or inf. A learning rate far too large often never produces one:
SGD at lr=1e12 takes the weights to ~1e9 in one step, AdamW at lr=1e6 moves
every weight by ~1e6 and then sees zero gradients (every unit saturated), and
both runs would "finish". The guard watches two cheap numbers, at each log
step and before each checkpoint (so a destroyed model is never saved):

- the global L2 norm of the parameters, against its value when the run
  started: above `divergence.param_norm_factor` times it, the weights have
  left any sane region (training moves norms by a few percent to a few x);
- the mean training loss of a log window, against the first window's: above
  `divergence.loss_factor` times it (at least 0.1, so a near-zero start does
  not make every wobble look like a blow-up) for `divergence.patience` log
  windows in a row.

`divergence.action`: stop (the default; exit status 3, no checkpoint is
written from the diverged weights), warn, or off.
"""
from __future__ import annotations

LOSS_FLOOR = 0.1


class DivergenceGuard:
    def __init__(self, cfg):
        self.action = cfg.get("action", "stop")
        self.norm_factor = float(cfg.get("param_norm_factor", 100.0))
        self.loss_factor = float(cfg.get("loss_factor", 10.0))
        self.patience = int(cfg.get("patience", 3))
        self.start_norm: float | None = None
        self.first_loss: float | None = None
        self.bad_windows = 0

    @property
    def enabled(self) -> bool:
        return self.action != "off"

    def check_norm(self, norm: float) -> str | None:
        """A problem description, or None. The first call sets the reference."""
        if self.start_norm is None:
            self.start_norm = norm
            return None
        if norm > self.norm_factor * self.start_norm:
            return (f"the parameter norm is {norm:.4g}, {norm / self.start_norm:.3g}x its starting value "
                    f"{self.start_norm:.4g} (divergence.param_norm_factor={self.norm_factor:g})")
        return None

    def check_loss(self, loss: float) -> str | None:
        if self.first_loss is None:
            self.first_loss = loss
            return None
        limit = self.loss_factor * max(self.first_loss, LOSS_FLOOR)
        self.bad_windows = self.bad_windows + 1 if loss > limit else 0
        if self.bad_windows >= self.patience:
            return (f"the training loss is {loss:.4g}, above {limit:.4g} ({self.loss_factor:g}x its first logged "
                    f"value {self.first_loss:.4g}) for {self.bad_windows} log windows in a row "
                    f"(divergence.loss_factor, divergence.patience)")
        return None

    def state(self) -> dict:
        return {"start_norm": self.start_norm, "first_loss": self.first_loss, "bad_windows": self.bad_windows}

    def load_state(self, state: dict) -> None:
        self.start_norm, self.first_loss = state["start_norm"], state["first_loss"]
        self.bad_windows = state["bad_windows"]
