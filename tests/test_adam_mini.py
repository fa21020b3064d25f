"""Tests for adam_mini.py and param_roles.py on tiny random Llama / GPT-2 / GPT-NeoX models.

Every numerical test compares against an independent computation: the official
adam-mini package, or a plain-torch float64 Adam-mini written here from the
formula with block ids written out by hand for each architecture.
"""

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefopt.memory import optimizer_state_bytes  # noqa: E402
from prefopt.optim.adam_mini import AdamMini, build_adam_mini, official_adam_mini  # noqa: E402
from prefopt.optim.param_roles import ParamRole, parameter_roles  # noqa: E402

transformers.logging.set_verbosity_error()

# tiny geometry shared by all models: hidden 32, 4 query heads of 8, GQA with 2 kv heads
H, NH, NKV, HD, VOCAB, INTER, LAYERS = 32, 4, 2, 8, 64, 48, 2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=NH, num_key_value_heads=NKV)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=NH, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_neox(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                     num_hidden_layers=LAYERS, num_attention_heads=NH)
    return transformers.GPTNeoXForCausalLM(cfg)


# ---------------------------------------------------------------------------
# Hand-written partitions for the paper rule: for each parameter, None (full
# per-element v) or a LongTensor of its shape giving every element's block.

def zeros_ids(p):
    return torch.zeros(p.shape, dtype=torch.long)


def llama_block_ids(name, p):
    if "embed_tokens" in name or "lm_head" in name:
        return None
    if "q_proj" in name or "k_proj" in name:  # nn.Linear (out, in): head h owns rows h*HD..(h+1)*HD-1
        return (torch.arange(p.shape[0]) // HD)[:, None].expand(p.shape).clone()
    return zeros_ids(p)


def gpt2_block_ids(name, p):
    if "wte" in name:  # tied with lm_head
        return None
    col = torch.arange(3 * H)
    if "c_attn.weight" in name:  # Conv1D (in, 3H): columns Q heads 0-3 | K heads 4-7 | V = block 8
        return torch.where(col < 2 * H, col // HD, 2 * NH)[None, :].expand(p.shape).clone()
    if "c_attn.bias" in name:  # Q bias, K bias, V bias
        return col // H
    return zeros_ids(p)


def neox_block_ids(name, p):
    if "embed_in" in name or "lm_head" in name:
        return None
    row = torch.arange(3 * H)
    head, part = row // (3 * HD), (row // HD) % 3  # rows are [head, (q, k, v), head_dim]
    if "query_key_value.weight" in name:
        ids = torch.where(part == 0, head, torch.where(part == 1, NH + head, 2 * NH))
        return ids[:, None].expand(p.shape).clone()
    if "query_key_value.bias" in name:
        return part.clone()
    return zeros_ids(p)


def decays(name):
    return not ("bias" in name or "norm" in name or ".ln_" in name)


class ReferenceAdamMini:
    """Adam-mini from the formula, in float64, one parameter at a time."""

    def __init__(self, params, block_ids, lr, betas, eps, wd):
        self.p = {n: p.detach().double().clone() for n, p in params.items()}
        self.ids = block_ids
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.m = {n: torch.zeros_like(p) for n, p in self.p.items()}
        self.v = {n: (torch.zeros_like(p) if block_ids[n] is None else {}) for n, p in self.p.items()}
        self.t = {n: 0 for n in self.p}

    def step(self, grads):
        for n, p in self.p.items():
            if grads.get(n) is None:
                continue
            g = grads[n].double()
            self.t[n] += 1
            t = self.t[n]
            if decays(n):
                p.mul_(1 - self.lr * self.wd)
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            ids = self.ids[n]
            if ids is None:
                self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
                v = self.v[n]
            else:
                v = torch.empty_like(p)
                for b in ids.unique().tolist():
                    mask = ids == b
                    self.v[n][b] = self.b2 * self.v[n].get(b, 0.0) + (1 - self.b2) * (g[mask] ** 2).mean()
                    v[mask] = self.v[n][b]
            m_hat = self.m[n] / (1 - self.b1 ** t)
            v_hat = v / (1 - self.b2 ** t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


# the update paths: default (tiny test tensors all go the batched _foreach way), batched
# only (as on GPU), and the fused-kernel paths forced on tiny tensors (streamed on CPU,
# and batched as on GPU)
PATHS = {"default": {}, "batched": {"stream_on_cpu": False}, "fused": {"min_fused_numel": 0},
         "fused-batched": {"min_fused_numel": 0, "stream_on_cpu": False}}


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("make_model,block_ids", [(tiny_llama, llama_block_ids), (tiny_gpt2, gpt2_block_ids),
                                                  (tiny_neox, neox_block_ids)], ids=["llama", "gpt2", "neox"])
def test_paper_partition_matches_reference(make_model, block_ids, paths, monkeypatch):
    for attr, value in PATHS[paths].items():
        monkeypatch.setattr(AdamMini, attr, value)
    model = make_model()
    params = dict(model.named_parameters())
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = build_adam_mini(model, partition="paper", **hp)
    ref = ReferenceAdamMini(params, {n: block_ids(n, p) for n, p in params.items()},
                            hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    names = list(params)
    for step in range(4):
        grads = {}
        for i, (n, p) in enumerate(params.items()):
            g = torch.randn(p.shape, generator=gen) * (0.1 + i % 5)  # different scales per tensor
            if p.dim() == 2 and step % 2 == 1:  # non-contiguous gradient (the fused kernels need contiguous)
                g = torch.randn(p.shape[::-1], generator=gen).t()
            if "embed" in n or "wte" in n:
                g[::3] = 0  # rows of tokens absent from the batch
            grads[n] = g
        if step == 2:  # a tensor without gradient is skipped and its step count falls behind
            grads[names[3]] = None
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        ref.step(grads)
    for n, p in params.items():
        torch.testing.assert_close(p.detach().double(), ref.p[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert opt.state[params[names[3]]]["step"].item() == 3 and opt.state[params[names[0]]]["step"].item() == 4


@pytest.mark.parametrize("paths", ["default", "fused-batched"])
def test_neuron_partition_matches_official_package(paths, monkeypatch):
    for attr, value in PATHS[paths].items():
        monkeypatch.setattr(AdamMini, attr, value)
    Official = official_adam_mini()  # the package is also named adam_mini; our file shadows it
    if Official is None:
        pytest.skip("adam-mini (official package) is not installed")
    ours_model = tiny_llama()
    ref_model = copy.deepcopy(ours_model)
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.1)
    ours = build_adam_mini(ours_model, betas=[0.9, 0.95], partition="neuron", **hp)  # betas as a YAML list
    ref = Official(ref_model.named_parameters(), betas=(0.9, 0.95), dim=H, n_heads=NH, n_kv_heads=NKV,
                   verbose=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randint(0, VOCAB, (4, 16), generator=gen)
        losses = []
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        # the second moments agree block by block (official: "vmean" per head/row/tensor).
        # v is a mean of g^2 computed from slightly different weights: a little looser
        ref_v = ref.state[q]["vmean"]
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"].reshape(-1), ref_v.reshape(-1),
                                   rtol=1e-4, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_paper_and_neuron_partitions_differ():
    """Guards the comparisons above: the two partitions must give different results."""
    out = []
    for partition in ("paper", "neuron"):
        model = tiny_llama()
        opt = build_adam_mini(model, lr=1e-2, partition=partition)
        x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        out.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
    assert not torch.allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Roles and block counts, checked against numbers worked out by hand

def blocks(model, partition="paper"):
    opt = build_adam_mini(model, partition=partition)
    return {n: (kind if kind == "full" else nb) for n, _, kind, nb in opt.partition_table()}


def test_llama_gqa_roles_and_blocks():
    model = tiny_llama()
    roles = parameter_roles(model)
    a = "model.layers.0.self_attn."
    assert roles[a + "q_proj.weight"] == ParamRole("query", num_heads=NH, head_dim=HD)
    assert roles[a + "k_proj.weight"] == ParamRole("key", num_heads=NKV, head_dim=HD)
    assert roles[a + "v_proj.weight"].role == "value" and roles[a + "o_proj.weight"].role == "attn_out"
    assert roles["model.layers.1.mlp.down_proj.weight"].role == "mlp"
    assert roles["model.layers.1.input_layernorm.weight"].role == "norm"
    assert roles["model.embed_tokens.weight"].role == "embedding" and roles["lm_head.weight"].role == "output"

    b = blocks(model)
    assert b[a + "q_proj.weight"] == 4 and b[a + "k_proj.weight"] == 2  # K: num_key_value_heads blocks
    for n in ("v_proj", "o_proj"):
        assert b[a + n + ".weight"] == 1
    assert b["model.layers.0.mlp.gate_proj.weight"] == 1 and b["model.norm.weight"] == 1
    assert b["model.embed_tokens.weight"] == "full" and b["lm_head.weight"] == "full"
    # per layer 4 + 2 + 1 + 1 + 3 (mlp) + 2 (norms) = 13; + final norm
    assert sum(x for x in b.values() if x != "full") == 13 * LAYERS + 1

    n = blocks(model, "neuron")  # the official package's counts
    assert n[a + "q_proj.weight"] == 4 and n[a + "k_proj.weight"] == 2
    assert n[a + "v_proj.weight"] == NKV * HD and n[a + "o_proj.weight"] == H
    assert n["model.layers.0.mlp.gate_proj.weight"] == INTER and n["model.layers.0.mlp.down_proj.weight"] == H
    assert n["model.embed_tokens.weight"] == VOCAB and n["lm_head.weight"] == VOCAB


def test_gpt2_fused_qkv_roles_and_blocks():
    model = tiny_gpt2()
    roles = parameter_roles(model)
    r = roles["transformer.h.0.attn.c_attn.weight"]
    assert (r.role, r.num_heads, r.num_kv_heads, r.head_dim, r.qkv_layout, r.transposed) == \
        ("qkv", NH, NH, HD, "concat", True)
    assert roles["transformer.h.0.attn.c_proj.weight"].role == "attn_out"
    assert roles["transformer.h.0.mlp.c_fc.weight"] == ParamRole("mlp", transposed=True)
    assert roles["transformer.ln_f.weight"].role == "norm" and roles["transformer.ln_f.bias"].role == "bias"
    assert roles["transformer.wte.weight"].role == "embedding"  # tied lm_head: one tensor, an embedding
    assert "lm_head.weight" not in roles

    b = blocks(model)
    assert b["transformer.h.0.attn.c_attn.weight"] == NH + NH + 1  # Q per head, K per head, V one
    assert b["transformer.h.0.attn.c_attn.bias"] == 3  # Q, K, V parts
    assert b["transformer.h.0.attn.c_proj.weight"] == 1 and b["transformer.h.1.mlp.c_fc.weight"] == 1
    assert b["transformer.wte.weight"] == "full" and b["transformer.wpe.weight"] == 1


def test_neox_interleaved_qkv_roles_and_blocks():
    model = tiny_neox()
    roles = parameter_roles(model)
    r = roles["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert (r.role, r.num_heads, r.head_dim, r.qkv_layout, r.transposed) == ("qkv", NH, HD, "interleaved", False)
    assert r.qkv_parts()[:6] == ["q", "k", "v", "q", "k", "v"]
    assert roles["gpt_neox.layers.0.attention.dense.weight"].role == "attn_out"
    assert roles["gpt_neox.final_layer_norm.weight"].role == "norm"
    b = blocks(model)
    assert b["gpt_neox.layers.0.attention.query_key_value.weight"] == 2 * NH + 1
    assert b["gpt_neox.layers.0.attention.query_key_value.bias"] == 3
    assert b["gpt_neox.embed_in.weight"] == "full" and b["lm_head.weight"] == "full"
    n = blocks(model, "neuron")
    assert n["gpt_neox.layers.0.attention.query_key_value.weight"] == 2 * NH + H  # V per output neuron
    assert n["gpt_neox.layers.0.attention.query_key_value.bias"] == "full"


def test_unknown_architecture_falls_back_to_one_block_per_tensor():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    roles = parameter_roles(model)
    assert roles["0.weight"].role == "other" and roles["1.weight"].role == "other"
    assert roles["1.bias"].role == "bias" and roles["2.weight"].role == "norm"
    opt = build_adam_mini(model, lr=1e-2)
    assert all(nb == 1 for *_, nb in opt.partition_table())
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()


# ---------------------------------------------------------------------------
# Memory, checkpoints, hooks

def test_state_bytes_exact():
    model = tiny_llama()
    opt = build_adam_mini(model)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = LAYERS * 9 + 3
    v_full = 2 * VOCAB * H                       # embedding + lm_head keep Adam's v
    v_blocks = LAYERS * (NH + NKV + 1 + 1 + 3 + 2) + 1
    expected = 4 * n_params + 4 * v_full + 4 * v_blocks + 4 * n_tensors  # m, v, v, step (fp32)
    assert optimizer_state_bytes(opt)[0] == expected
    assert sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()) == expected
    adamw = 8 * n_params + 4 * n_tensors
    assert expected < adamw


def _train(model, opt, seed, steps=3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 12), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("partition", ["paper", "neuron"])
def test_state_dict_round_trip(partition):
    model_a = tiny_llama()
    opt_a = build_adam_mini(model_a, lr=1e-2, weight_decay=0.1, partition=partition)
    _train(model_a, opt_a, seed=0)

    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_b = tiny_llama(seed=123)
    model_b.load_state_dict(ckpt["model"])
    opt_b = build_adam_mini(model_b, lr=1e-2, weight_decay=0.1, partition=partition)
    opt_b.load_state_dict(ckpt["optim"])

    _train(model_a, opt_a, seed=1)
    _train(model_b, opt_b, seed=1)
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), (n, key)

    other = "neuron" if partition == "paper" else "paper"
    with pytest.raises(ValueError, match="partition"):
        build_adam_mini(tiny_llama(), partition=other).load_state_dict(opt_a.state_dict())


@pytest.mark.parametrize("paths", ["default", "fused"])
def test_block_stats_is_the_only_reduction(paths, monkeypatch):
    """The FSDP hook: scaling both sums and counts (as an all-reduce over
    identical shards would) must not change anything; scaling only the sums must."""
    for attr, value in PATHS[paths].items():
        monkeypatch.setattr(AdamMini, attr, value)
    class Scaled(AdamMini):
        def __init__(self, *a, sum_factor=1.0, count_factor=1.0, **kw):
            super().__init__(*a, **kw)
            self.factors, self.calls = (sum_factor, count_factor), 0

        def block_stats(self, grads, layouts):
            self.calls += len(grads)
            sums, counts = super().block_stats(grads, layouts)
            return [s * self.factors[0] for s in sums], [c * self.factors[1] for c in counts]

    results = []
    for factors in ((1.0, 1.0), (3.0, 3.0), (4.0, 1.0)):
        model = tiny_llama()
        opt = Scaled(model.named_parameters(), parameter_roles(model), lr=1e-2,
                     sum_factor=factors[0], count_factor=factors[1])
        _train(model, opt, seed=0, steps=2)
        assert opt.calls == 2 * sum(1 for n, lay in opt.layouts.items() if not lay.full)  # every blocked tensor, every step
        results.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0], results[2])


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_adam_mini(tiny_llama(), partition="heads")
    with pytest.raises(TypeError):
        build_adam_mini(tiny_llama(), momentum=0.9)


def test_fused_decayed_step_is_adamw_style_decay_in_one_pass():
    """The folded kernel call equals the two-pass update p *= 1-eta; m = lerp(m, g);
    p -= s*m, step after step with a changing step size and decay (an LR schedule),
    and the buffer is m + shift*p; float64, so only the algebra is tested."""
    from prefopt.optim.adam_mini import _fused_decayed_step

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, dtype=torch.float64, generator=gen)
    b, m, ref_p, shift, beta1 = torch.zeros_like(p), torch.zeros_like(p), p.clone(), 0.0, 0.9
    for s, eta in [(1e-2, 1e-3), (2e-2, 5e-4), (5e-3, 0.0), (1e-2, 2e-3)]:
        g = torch.randn(300, dtype=torch.float64, generator=gen)
        shift = _fused_decayed_step(p, g, b, s, eta, beta1, shift)
        ref_p.mul_(1 - eta)
        m = beta1 * m + (1 - beta1) * g
        ref_p -= s * m
        torch.testing.assert_close(p, ref_p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b - shift * p, m, rtol=1e-10, atol=1e-13)


def test_state_dict_round_trip_on_the_fused_decayed_path():
    """Checkpoints of tensors big enough for the CPU fused path: there, with
    weight decay, exp_avg holds m + decay_shift * p (see _fused_decayed_step),
    so a resumed optimizer that lost decay_shift would read a wrong m. The MLP
    matrices here (64 x 1536 = 98304 elements, one block each) are above
    min_fused_numel; the tiny models above are all below it. Steps, saves,
    loads into a fresh optimizer and model, continues: bit-for-bit equal to the
    uninterrupted run, weights and state."""
    def make(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=1536, num_hidden_layers=1,
                                       num_attention_heads=NH, num_key_value_heads=NKV)
        model = transformers.LlamaForCausalLM(cfg)
        return model, build_adam_mini(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    model_a, opt_a = make(0)
    fused = {n for n, p in model_a.named_parameters() if opt_a._info[p].path == "fused"}
    assert fused == {f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    assert all(p.numel() > AdamMini.min_fused_numel for n, p in model_a.named_parameters() if n in fused)
    _train(model_a, opt_a, seed=0)
    saved = opt_a.state_dict()
    shifts = {n: opt_a.state[p].get("decay_shift") for n, p in model_a.named_parameters() if n in fused}
    assert all(s for s in shifts.values()), f"the fused decayed path was not taken: {shifts}"
    assert sum("decay_shift" in s for s in saved["state"].values()) == len(fused)

    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optim": saved}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_b, opt_b = make(123)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["optim"])
    restored = {n: opt_b.state[p].get("decay_shift") for n, p in model_b.named_parameters() if n in fused}

    _train(model_a, opt_a, seed=1)
    _train(model_b, opt_b, seed=1)
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), f"{n}: weights differ after resuming, max |diff| {(p - q).abs().max().item():.3g}"
        a, b = opt_a.state[p], opt_b.state[q]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key]), (n, key)
        assert a.get("decay_shift") == b.get("decay_shift"), (n, "decay_shift")
    assert restored == shifts
