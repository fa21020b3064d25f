"""Optimizers chosen by name: every torch.optim class trains or is refused in
one line, CLI keywords reach the constructor, and optimizer-state bytes equal
the analytic formula."""
import inspect
from collections import defaultdict

import pytest
import torch
from conftest import compose

from prefopt import optim as optimizers
from prefopt.memory import optimizer_state_bytes
from prefopt.optim import registry, signature_defaults
from utils import ConfigError

# The micro model of conftest.MICRO_MODEL, counted by hand from its shapes:
# vocab V=259 (256 bytes + 3 specials), hidden h=32, intermediate i=64, 1 layer, untied head.
V, H, I = 259, 32, 64
N_PARAMS = V * H + (4 * H * H + 3 * H * I + 2 * H) + H + H * V     # 26,912
N_TENSORS = 1 + 4 + 3 + 2 + 1 + 1                                  # embed, qkvo, mlp x3, 2 norms, final norm, head
PARAM_BYTES = 4 * N_PARAMS                                         # fp32


def torch_optimizer_names():
    return sorted(n for n in dir(torch.optim) if inspect.isclass(getattr(torch.optim, n))
                  and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer")


def train_steps(trainer, n=3):
    window = defaultdict(list)
    for _ in range(n):
        trainer.train_step(window)
    return window


def test_param_count_matches_hand_count(micro_trainer):
    t = micro_trainer()
    assert sum(p.numel() for p in t.policy.parameters()) == N_PARAMS == 26_912
    assert len(list(t.policy.parameters())) == N_TENSORS


@pytest.mark.parametrize("name", torch_optimizer_names())
def test_every_torch_optimizer_trains_or_is_refused(micro_trainer, name):
    """Enumerates the installed torch: each optimizer either takes 3 steps that
    change the weights with finite losses, or is refused at build time with a
    one-line reason."""
    try:
        t = micro_trainer(f"optimizer={name}")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and name in msg and len(msg) < 300, msg
        return
    before = [p.detach().clone() for p in t.policy.parameters()]
    window = train_steps(t)
    assert all(torch.isfinite(v).all() for v in window["loss/train"])
    changed = sum(not torch.equal(b, p) for b, p in zip(before, t.policy.parameters()))
    assert changed > 0, f"{name} did not change any parameter"


def test_refusals_are_the_expected_ones(micro_trainer):
    for name in ("SparseAdam", "LBFGS"):
        with pytest.raises(ConfigError, match=name):
            micro_trainer(f"optimizer={name}")


@pytest.mark.parametrize("name", torch_optimizer_names())
def test_config_node_has_every_constructor_keyword(name):
    cfg = compose(f"optimizer={name}")
    # the registry's target: torch's class, except Muon (prefopt pairs it with AdamW)
    sig = inspect.signature(optimizers.find_entry(name).target)
    expected = {k for k in sig.parameters if k not in ("self", "params", "model", "lr")}
    assert set(cfg.optimizer) - {"name"} == expected
    assert cfg.optimizer.name == name


def test_cli_keywords_reach_the_constructor(micro_trainer):
    t = micro_trainer("optimizer=AdamW", "optimizer.betas=[0.9,0.95]", "optimizer.weight_decay=0.1", "lr=5e-7")
    groups = t.optimizer.param_groups
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == pytest.approx(5e-7) for g in groups)
    # weight matrices decay; norms (1-D) and embeddings don't
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    emb = t.policy.get_input_embeddings().weight
    assert id(emb) in no_decay
    assert id(t.policy.model.layers[0].self_attn.q_proj.weight) in decay
    assert all(p.ndim == 1 for g in groups if g["weight_decay"] == 0.0 for p in g["params"] if p is not emb
               and p is not t.policy.get_output_embeddings().weight)

    t = micro_trainer("optimizer=SGD", "optimizer.momentum=0.9", "optimizer.nesterov=true")
    assert t.optimizer.param_groups[0]["momentum"] == 0.9 and t.optimizer.param_groups[0]["nesterov"]


def test_unknown_keyword_is_one_line(micro_trainer):
    from omegaconf import open_dict

    t = micro_trainer("optimizer=SGD", setup=False)
    with open_dict(t.cfg):
        t.cfg.optimizer.momentun = 0.9
    with pytest.raises(ConfigError, match="momentun is not a keyword of SGD"):
        t.setup()


@pytest.mark.parametrize("name, overrides, expected", [
    ("SGD", [], {}),                                                   # no state at all
    ("SGD", ["optimizer.momentum=0.9"], {"momentum_buffer": PARAM_BYTES}),
    ("RMSprop", [], {"square_avg": PARAM_BYTES, "step": 4 * N_TENSORS}),
    ("AdamW", [], {"exp_avg": PARAM_BYTES, "exp_avg_sq": PARAM_BYTES, "step": 4 * N_TENSORS}),
    ("Adam", [], {"exp_avg": PARAM_BYTES, "exp_avg_sq": PARAM_BYTES, "step": 4 * N_TENSORS}),
    ("Adagrad", [], {"sum": PARAM_BYTES, "step": 4 * N_TENSORS}),
])
def test_state_bytes_match_analytic_formula(micro_trainer, name, overrides, expected):
    t = micro_trainer(f"optimizer={name}", *overrides)
    train_steps(t, 1)
    total, by_name = optimizer_state_bytes(t.optimizer)
    assert by_name == expected
    assert total == sum(expected.values())
    metrics = t.memory_metrics()
    assert metrics["memory/optimizer_state_bytes"] == total
    assert metrics["memory/params_bytes"] == PARAM_BYTES
    assert metrics["memory/grads_bytes"] == PARAM_BYTES
    for k, v in expected.items():
        assert metrics[f"memory/optimizer_state/{k}_bytes"] == v


def test_shared_storage_counted_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.zeros(10)
    opt.state[p] = {"a": buf, "b": buf[:5]}  # a view of the same storage
    assert optimizer_state_bytes(opt) == (40, {"a": 40})


class _Quantized(torch.Tensor):
    """A wrapper tensor subclass like torchao's 4-/8-bit optimizer state: its
    memory is in inner tensors (codes, scales); its own storage is not real."""

    @staticmethod
    def __new__(cls, codes, scale, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)

    def __init__(self, codes, scale, shape):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on a test wrapper")


def test_state_bytes_open_up_quantized_tensor_subclasses():
    from types import SimpleNamespace

    codes, scale = torch.zeros(1024, dtype=torch.uint8), torch.ones(4)
    state = SimpleNamespace(state={0: {"exp_avg": _Quantized(codes, scale, (1024,)), "step": torch.tensor(1.0)}})
    total, per_name = optimizer_state_bytes(state)
    assert per_name == {"exp_avg": 1024 + 16, "step": 4} and total == 1044


def test_signature_defaults_are_plain_config_values():
    for name, entry in registry().items():
        if entry.target is None:
            continue
        for key, value in signature_defaults(entry.target).items():
            assert value is None or isinstance(value, (bool, int, float, str, list)), (name, key, value)
