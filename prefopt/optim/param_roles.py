"""
Structural roles of the parameters of a Hugging Face causal LM.

Optimizers such as Adam-mini treat parameters differently depending on what
they *are* (query/key projections are split by attention head, embeddings keep
a per-element second moment, norms and biases get no weight decay, ...).
Matching on parameter-name substrings is brittle (GPT-2's "c_attn" is Q, K and
V at once; GPT-NeoX's "final_layer_norm" contains "final_layer"; "ln" matches
"kiln"), so here the roles are read off the model itself:

- embedding / output: model.get_input_embeddings() / get_output_embeddings(),
  compared by tensor identity (a tied lm_head is the embedding, counted once);
- norms: modules that are LayerNorm/RMSNorm types (isinstance, or a class name
  ending in "Norm", which covers LlamaRMSNorm and friends);
- decoder layers: the nn.ModuleList with config.num_hidden_layers identical
  blocks that contain an attention module;
- attention: inside each layer, the outermost module whose class name contains
  "Attention"; its Linear/Conv1D children are Q, K, V, O or a fused QKV. Head
  counts and head_dim come from model.config, and every projection's shape is
  checked against them. Names are used only to tell apart siblings that have
  the same shape (K and V under GQA are both (n_kv_heads*head_dim, hidden)).
- mlp: Linear/Conv1D weights inside a decoder layer but outside attention.

Anything that does not fit falls back to role "other" (one tensor, nothing
assumed). parameter_roles() never raises on an unknown architecture.

Supported and tested: Llama (incl. GQA), GPT-2 (fused Conv1D c_attn),
GPT-NeoX/Pythia (fused, per-head interleaved query_key_value). Other models
with separate q/k/v/o projections (Mistral, Qwen2, ...) are recognised by the
same rules; fused QKV layouts are only trusted for the model types listed in
_FUSED_QKV_LAYOUT because the row order cannot be inferred from shapes.
"""

import warnings
from dataclasses import dataclass

import torch.nn as nn

from prefopt.model_structure import decoder_blocks, embedding_weights, is_attention, text_config

try:  # GPT-2 style "Conv1D": a Linear whose weight is stored (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers missing or moved: no Conv1D layers to find
    Conv1D = None

ROLES = ("embedding", "output", "query", "key", "value", "qkv", "attn_out",
         "mlp", "norm", "bias", "lora_a", "lora_b", "other")


@dataclass(frozen=True)
class ParamRole:
    """What one parameter tensor is.

    role:         one of ROLES.
    num_heads:    query/key: number of head blocks (K under GQA: num_key_value_heads);
                  qkv (and its fused bias): number of query heads. None otherwise.
    head_dim:     size of one head along the output dimension (query/key/qkv).
    num_kv_heads: qkv only: number of key (= value) heads.
    qkv_layout:   fused QKV only. "concat": output features are Q | K | V
                  (GPT-2 c_attn); "interleaved": per head [q, k, v] blocks of
                  head_dim each, i.e. [heads, 3, head_dim] (GPT-NeoX).
    transposed:   weight stored as (in_features, out_features), i.e. the output
                  features run along dim 1 (transformers' Conv1D).
    """
    role: str
    num_heads: int = None
    head_dim: int = None
    num_kv_heads: int = None
    qkv_layout: str = None
    transposed: bool = False

    def qkv_parts(self):
        """For a fused QKV tensor: 'q'/'k'/'v' for each head-sized slot along
        the output dimension, in memory order (slot i covers output features
        [i*head_dim, (i+1)*head_dim))."""
        if self.qkv_layout == "concat":
            return ["q"] * self.num_heads + ["k"] * self.num_kv_heads + ["v"] * self.num_kv_heads
        if self.qkv_layout == "interleaved":
            return ["q", "k", "v"] * self.num_heads
        raise ValueError(f"not a fused QKV role: {self}")


def no_decay(role, decay_embeddings=True):
    """True if weight decay should be skipped: biases and norm gains always
    (decaying them towards 0 only hurts), input embeddings if the caller asks."""
    if role.role in ("bias", "norm"):
        return True
    return role.role == "embedding" and not decay_embeddings


# Row order of fused QKV projections, per config.model_type. It cannot be told
# from shapes, so only layouts we have read in the modeling code (and tested).
_FUSED_QKV_LAYOUT = {
    "gpt2": "concat",          # Conv1D c_attn, output split(hidden, dim=-1) into q, k, v
    "gpt_neox": "interleaved",  # view(..., heads, 3*head_dim).chunk(3, dim=-1)
}

# Attribute names (inside an attention module) that tell same-shaped siblings
# apart. Shapes are always checked as well.
_Q_NAMES = {"q_proj", "query", "wq", "q", "q_lin"}
_K_NAMES = {"k_proj", "key", "wk", "k", "k_lin"}
_V_NAMES = {"v_proj", "value", "wv", "v", "v_lin"}
_O_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin"}
_QKV_NAMES = {"c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv"}


def _is_linear(mod):
    return isinstance(mod, nn.Linear) or (Conv1D is not None and isinstance(mod, Conv1D))


def _linear_shape(mod):
    """(out_features, in_features, transposed) of a Linear or Conv1D."""
    w = mod.weight
    if Conv1D is not None and isinstance(mod, Conv1D):
        return w.shape[1], w.shape[0], True
    return w.shape[0], w.shape[1], False


def _is_norm(mod):
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    return isinstance(mod, norm_types) or type(mod).__name__.endswith("Norm")


def _head_geometry(cfg):
    """(num_heads, num_kv_heads, head_dim, hidden) from a config, or None."""
    nh = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not nh or not hidden:
        return None
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or hidden // nh
    return nh, nkv, hd, hidden


def _outermost_attention(layer):
    """Attention modules in a layer, not nested in another attention module."""
    found = []
    for mod in layer.modules():
        if mod is not layer and is_attention(mod):
            if not any(any(m is mod for m in outer.modules()) for outer in found):
                found.append(mod)
    return found


def _attention_roles(attn, geom, model_type):
    """{id(weight or bias): ParamRole} for the projections of one attention module."""
    nh, nkv, hd, hidden = geom
    roles = {}
    for name, mod in attn.named_modules():
        if not _is_linear(mod) or getattr(mod, "weight", None) is None:
            continue
        local = name.rsplit(".", 1)[-1].lower()
        out, inp, tr = _linear_shape(mod)
        role = None
        if local in _QKV_NAMES and out == (nh + 2 * nkv) * hd and inp == hidden:
            layout = _FUSED_QKV_LAYOUT.get(model_type)
            if layout == "interleaved" and nkv != nh:
                layout = None  # [heads, 3, head_dim] has no room for fewer kv heads
            if layout is not None:
                role = ParamRole("qkv", num_heads=nh, head_dim=hd, num_kv_heads=nkv,
                                 qkv_layout=layout, transposed=tr)
        elif local in _Q_NAMES and out == nh * hd and inp == hidden:
            role = ParamRole("query", num_heads=nh, head_dim=hd, transposed=tr)
        elif local in _K_NAMES and out == nkv * hd and inp == hidden:
            role = ParamRole("key", num_heads=nkv, head_dim=hd, transposed=tr)
        elif local in _V_NAMES and out == nkv * hd and inp == hidden:
            role = ParamRole("value", transposed=tr)
        elif local in _O_NAMES and out == hidden and inp == nh * hd:
            role = ParamRole("attn_out", transposed=tr)
        if role is None:
            continue  # unknown projection: stays "other" (or "bias")
        roles[id(mod.weight)] = role
        bias = getattr(mod, "bias", None)
        if role.role == "qkv" and isinstance(bias, nn.Parameter):
            # keep the layout so an optimizer can split the bias into its Q, K, V parts
            roles[id(bias)] = ParamRole("bias", num_heads=nh, head_dim=hd, num_kv_heads=nkv,
                                        qkv_layout=role.qkv_layout)
    return roles


def parameter_roles(model):
    """Return {name: ParamRole} for every trainable parameter, with names as
    model.named_parameters() yields them (tied weights appear once)."""
    by_id = {}  # id(parameter) -> ParamRole; first assignment wins, so order = precedence

    def assign(param, role):
        if param is not None and id(param) not in by_id:
            by_id[id(param)] = role

    # 0) PEFT's LoRA matrices (peft=lora/dora), by name: they sit inside the
    #    projections whose roles are found below, but are not those weights.
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assign(p, ParamRole("lora_a" if ".lora_A." in name else "lora_b"))

    # 1) embedding / output, by identity. A tied lm_head *is* the embedding.
    try:
        emb = model.get_input_embeddings()
        assign(getattr(emb, "weight", None), ParamRole("embedding"))
    except Exception:
        pass
    try:
        out = model.get_output_embeddings()
        if out is not None:
            assign(getattr(out, "weight", None), ParamRole("output"))
    except Exception:
        pass

    # 2) attention projections and MLP weights of each decoder layer.
    cfg = text_config(model)
    geom = _head_geometry(cfg) if cfg is not None else None
    try:
        layers = decoder_blocks(model, cfg) if geom is not None else []
        for layer in layers:
            attns = _outermost_attention(layer)
            for attn in attns:
                for pid, role in _attention_roles(attn, geom, getattr(cfg, "model_type", None)).items():
                    by_id.setdefault(pid, role)
            in_attn = {id(m) for a in attns for m in a.modules()}
            for mod in layer.modules():
                if id(mod) not in in_attn and _is_linear(mod) and isinstance(mod.weight, nn.Parameter):
                    assign(mod.weight, ParamRole("mlp", transposed=_linear_shape(mod)[2]))
    except Exception as e:  # never crash on an unexpected architecture
        warnings.warn(f"parameter_roles: structure detection failed ({e!r}); using generic roles")

    # 3) norms and biases anywhere; a norm's bias is a bias (decay-free, and the
    #    official Adam-mini gives every bias Adam's full v).
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "bias":
                assign(p, ParamRole("bias"))
            elif _is_norm(mod):
                assign(p, ParamRole("norm"))

    return {name: by_id.get(id(p), ParamRole("other"))
            for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------
# Parameter groups, built in one place: weight decay for weight matrices only.
# Biases and norm gains are 1-D (decaying them just fights the normalisation),
# and embeddings hold rare-token rows that decay would pull to zero, so they
# are excluded unless `decay_embeddings` is set.

def parameter_groups(model: nn.Module, weight_decay: float | None, decay_embeddings: bool) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params}]
    embeddings = set() if decay_embeddings else embedding_weights(model)
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
