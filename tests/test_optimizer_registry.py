"""Every name in the optimizer registry (torch.optim, prefopt's own,
bitsandbytes, torchao, pytorch_optimizer) either trains a tiny Llama for a
few steps, or is refused at build time with a one-line reason."""
import pytest
import torch

from prefopt import optim as optimizers
from prefopt.memory import optimizer_state_bytes
from utils import ConfigError

ALL_NAMES = sorted(optimizers.registry())


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    batch = torch.randint(0, 64, (4, 12))
    return model, batch, {k: v.clone() for k, v in model.state_dict().items()}


def train_a_little(model, optimizer, batch, max_steps=12):
    """Up to max_steps steps; stops once a weight moved (some optimizers,
    e.g. RAdam variants, deliberately skip their first few updates)."""
    before = [p.detach().clone() for p in model.parameters()]
    if hasattr(optimizer, "train"):
        optimizer.train()   # schedule-free optimizers keep two weight sequences
    for step in range(max_steps):
        optimizer.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        assert torch.isfinite(loss), f"loss {loss} at step {step}"
        loss.backward()
        optimizer.step()
        if any(not torch.equal(b, p) for b, p in zip(before, model.parameters())):
            return step + 1
    return None


def test_registry_is_large_and_namespaced():
    assert len(ALL_NAMES) > 140
    for name in ("AdamW", "RMSprop", "adam_mini", "Muon", "Lion", "CAME", "Adan", "SOAP", "Prodigy", "ADOPT",
                 "AdEMAMix", "ScheduleFreeAdamW", "GaLore", "APOLLO", "AdamW8bit", "PagedAdamW8bit"):
        assert name in ALL_NAMES, name
    assert optimizers.get_entry("AdamW").target is torch.optim.AdamW
    # a clash keeps the earlier source's class under the plain name, pytorch_optimizer's under po_
    clashes = [n for n in ALL_NAMES if n.startswith("po_")]
    assert clashes
    for name in clashes:
        assert optimizers.find_entry(name).target.__module__.startswith("pytorch_optimizer")
        assert not optimizers.find_entry(name[3:]).target.__module__.startswith("pytorch_optimizer")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_registry_optimizer_trains_or_is_refused(tiny, name):
    model, batch, init = tiny
    model.load_state_dict(init)
    entry = optimizers.find_entry(name)
    if entry.refuse:
        with pytest.raises(ConfigError) as e:
            optimizers.get_entry(name)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and len(msg) < 300
        return
    node = optimizers.signature_defaults(entry.target)
    try:
        optimizer = optimizers.build_optimizer(model, name, node, 1e-3, torch.device("cpu"), run_values={"max_steps": 10})
    except ConfigError as e:   # refused by the optimizer itself at build time (e.g. a required setting)
        assert "\n" not in str(e) and name in str(e) and "rejected its settings" in str(e)
        return
    steps = train_a_little(model, optimizer, batch)
    assert steps is not None, f"{name} did not change any weight in 12 steps"
    total, by_name = optimizer_state_bytes(optimizer)
    assert total == sum(by_name.values())


def test_muon_pairs_hidden_matrices_with_adamw(tiny):
    model, batch, init = tiny
    model.load_state_dict(init)
    opt = optimizers.build_optimizer(model, "Muon", {}, 1e-3, torch.device("cpu"))
    muon, adamw = opt.parts
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_params & adamw_params
    assert id(model.model.embed_tokens.weight) in adamw_params and id(model.lm_head.weight) in adamw_params
    assert id(model.model.layers[0].mlp.up_proj.weight) in muon_params
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert len(muon_params) + len(adamw_params) == len(list(model.parameters()))
    # one schedule drives both halves
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert all(g["lr"] == 0.5e-3 for g in muon.param_groups + adamw.param_groups)
    assert train_a_little(model, opt, batch) == 1
    sd = opt.state_dict()
    opt2 = optimizers.build_optimizer(model, "Muon", {}, 1e-3, torch.device("cpu"))
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(opt.state)


@pytest.mark.parametrize("name", ["AdamW", "adam_mini"])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_run_level_decay_embeddings_reaches_every_optimizer(tiny, name, decay_embeddings):
    """With zero gradients the only change a step makes is decoupled weight
    decay, p *= 1 - lr*wd; the embedding follows the run's decay_embeddings
    for adam_mini exactly as for AdamW, and matrices always decay."""
    model, _, init = tiny
    model.load_state_dict(init)
    node = dict(optimizers.signature_defaults(optimizers.get_entry(name).target), weight_decay=0.5)
    assert "decay_embeddings" not in node   # a run key, like lr
    opt = optimizers.build_optimizer(model, name, node, 0.1, torch.device("cpu"), decay_embeddings=decay_embeddings)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    embed, matrix = model.model.embed_tokens.weight, model.model.layers[0].mlp.up_proj.weight
    embed_before, matrix_before = embed.detach().clone(), matrix.detach().clone()
    opt.step()
    torch.testing.assert_close(matrix.detach(), matrix_before * 0.95)
    torch.testing.assert_close(embed.detach(), embed_before * 0.95 if decay_embeddings else embed_before)


def test_bitsandbytes_8bit_state_bytes(tiny):
    """AdamW8bit: tensors with >= 4096 elements keep two uint8 buffers (1 byte
    each) plus one fp32 absmax per 256 values each; smaller tensors keep fp32
    state like AdamW (state1/state2 at 4 bytes)."""
    model, batch, init = tiny
    model.load_state_dict(init)
    opt = optimizers.build_optimizer(model, "AdamW8bit", {}, 1e-3, torch.device("cpu"))
    train_a_little(model, opt, batch, max_steps=1)
    expected = 0
    for p in model.parameters():
        n = p.numel()
        if n >= 4096:
            expected += 2 * n + 2 * 4 * ((n + 255) // 256)     # uint8 state1+state2, fp32 absmax1+absmax2
        else:
            expected += 2 * 4 * n                              # fp32 state1+state2
    total, by_name = optimizer_state_bytes(opt)
    assert total - by_name.get("step", 0) == expected


@pytest.mark.parametrize("name", ["AdamW", "RMSprop", "Lion"])
def test_cpu_offload_mechanics_equal_the_plain_optimizer(tiny, name):
    """On this CPU-only machine the offload target is the CPU itself, but the
    mechanics are the real ones: state is created on the master copies (not
    the model's tensors), on the offload device, and the weights equal those
    of the plain optimizer after every step."""
    model, batch, init = tiny
    model.load_state_dict(init)
    plain = optimizers.build_optimizer(model, name, {}, 1e-3, torch.device("cpu"))
    for _ in range(3):
        train_a_little(model, plain, batch, max_steps=1)
    expected = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(init)
    offloaded = optimizers.build_optimizer(model, name, {}, 1e-3, torch.device("cpu"), offload_to="cpu")
    for _ in range(3):
        train_a_little(model, offloaded, batch, max_steps=1)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model_ids = {id(p) for p in model.parameters()}
    assert offloaded.state and not model_ids & {id(k) for k in offloaded.state}
    assert all(t.device.type == "cpu" for s in offloaded.state.values() for t in s.values() if torch.is_tensor(t))
    plain_total, _ = optimizer_state_bytes(plain)
    assert optimizer_state_bytes(offloaded)[0] == plain_total


def test_cpu_offload_is_a_no_op_on_cpu_and_says_so(micro_trainer, capsys):
    t = micro_trainer("cpu_offload=true")
    assert not isinstance(t.optimizer, optimizers.OffloadedOptimizer)
    assert "cpu_offload=true does nothing here" in capsys.readouterr().err


def test_schedule_free_switches_modes_around_eval(micro_trainer):
    from collections import defaultdict

    t = micro_trainer("optimizer=ScheduleFreeAdamW", "lr=1e-3")
    t.train_step(defaultdict(list))
    assert t.optimizer.param_groups[0]["train_mode"] is True
    t.evaluate()
    assert t.optimizer.param_groups[0]["train_mode"] is False
    t.train_step(defaultdict(list))
    assert t.optimizer.param_groups[0]["train_mode"] is True


# Every name the registry refuses by design, with a word of its reason. A name
# that becomes refused, or stops being refused, must be a deliberate change here.
REFUSED = {
    "SparseAdam": "sparse gradients", "LBFGS": "closure",                          # torch.optim
    "AliG": "closure", "BSAM": "closure", "AdaHessian": "Hessian", "SophiaH": "Hessian",   # pytorch_optimizer
    "LOMO": "into backward", "AdaLOMO": "into backward", "AdamMini": "optimizer=adam_mini",
    "po_Muon": "use_muon", "AdaMuon": "use_muon", "AdaGO": "use_muon", "NorMuon": "use_muon",
    "MuonClip": "use_muon", "DistributedMuon": "use_muon", "SpectralSphere": "2-D", "LoRARite": "LoRA",
    "Magma": "wraps another optimizer", "DeMo": "process group",
}
# Accepted by the registry, then refused by the optimizer's own constructor
# with its default settings ("rejected its settings").
REJECTED_AT_BUILD = {"SGD8bit": "momentum"}


def test_refused_names_are_pinned():
    import importlib.util

    from prefopt.optim.registry import TORCHAO_NAMES

    refused = {n: optimizers.find_entry(n).refuse for n in ALL_NAMES if optimizers.find_entry(n).refuse}
    # a missing optional package refuses its names; only torchao is optional (requirements-optional.txt)
    missing = {n for n, why in refused.items() if why.startswith("it needs the package '")}
    torchao_missing = importlib.util.find_spec("torchao") is None
    assert missing == (set(TORCHAO_NAMES) if torchao_missing else set()), \
        {n: refused[n] for n in missing}
    by_design = set(refused) - missing
    assert by_design == set(REFUSED), \
        f"newly refused: {sorted(by_design - set(REFUSED))}; no longer refused: {sorted(set(REFUSED) - by_design)}"
    for name, word in REFUSED.items():
        assert word in refused[name], (name, refused[name])
        with pytest.raises(ConfigError, match=f"optimizer={name} cannot be used: "):
            optimizers.get_entry(name)


def test_names_rejected_at_build_are_pinned(tiny):
    model, _, init = tiny
    model.load_state_dict(init)
    rejected = {}
    for name in ALL_NAMES:
        entry = optimizers.find_entry(name)
        if entry.refuse:
            continue
        try:
            optimizers.build_optimizer(model, name, optimizers.signature_defaults(entry.target), 1e-3,
                                       torch.device("cpu"), run_values={"max_steps": 10})
        except ConfigError as e:
            rejected[name] = str(e)
    assert set(rejected) == set(REJECTED_AT_BUILD), rejected
    for name, word in REJECTED_AT_BUILD.items():
        assert word in rejected[name] and "\n" not in rejected[name], rejected[name]


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    """The same tiny Llama with LoRA adapters (peft=lora): only they train."""
    import copy

    from omegaconf import OmegaConf

    from prefopt.adapters import add_adapters

    model, batch, _ = tiny
    lora = add_adapters(copy.deepcopy(model), OmegaConf.create(
        {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear", "use_dora": False}))
    return lora, batch, {k: v.clone() for k, v in lora.state_dict().items()}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_registry_optimizer_trains_adapters_or_is_refused(tiny_lora, name):
    """peft=lora: every optimizer moves the adapters and leaves the frozen base
    as it was (or is refused in one line, as on the full model)."""
    model, batch, init = tiny_lora
    model.load_state_dict(init)
    entry = optimizers.find_entry(name)
    if entry.refuse:
        return   # refused by name: test_every_registry_optimizer_trains_or_is_refused checks the message
    try:
        optimizer = optimizers.build_optimizer(model, name, optimizers.signature_defaults(entry.target), 1e-3,
                                               torch.device("cpu"), run_values={"max_steps": 10})
    except ConfigError as e:
        assert "\n" not in str(e) and name in str(e)
        return
    assert train_a_little(model, optimizer, batch) is not None, f"{name} did not change any adapter in 12 steps"
    after = model.state_dict()
    for key, value in init.items():
        assert ("lora_" in key) or torch.equal(after[key], value), f"{name} changed the frozen {key}"
