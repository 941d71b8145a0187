import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataselect.projection import KroneckerProjector, layer_split, rademacher
from dataselect.sketch import Sketcher, response_loss, sketched_modules
from dataselect.tokens import ModelError, encode, pad_batch


def test_encode_masks_the_prompt(tiny):
    _, tokenizer, rows = tiny
    messages = [{"role": "user", "content": rows[0]["question"]}, {"role": "assistant", "content": rows[0]["answer"]}]
    ids, n_prompt, truncated = encode(tokenizer, messages, 256)
    assert not truncated
    response = tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)
    assert response.replace(" ", "") == rows[0]["answer"].replace(" ", "")
    assert encode(tokenizer, messages, n_prompt).startswith("prompt alone is")
    short = encode(tokenizer, messages, n_prompt + 2)
    assert short[2] is True and len(short[0]) == n_prompt + 2


def _batch(tiny, n=4):
    model, tokenizer, rows = tiny
    enc = [encode(tokenizer, [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["answer"]}], 64) for r in rows[:n]]
    return model, pad_batch([(ids, k) for ids, k, _ in enc], tokenizer.pad_token_id)


def _loop_gradients(model, modules, batch, function=response_loss):
    """The reference: one example at a time, autograd.grad of its loss on each sketched weight."""
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    out, values = [], []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        f = function(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits,
                     one["input_ids"], one["target_mask"])[0]
        out.append(torch.autograd.grad(f, weights))
        values.append(f.item())
    for w, flag in zip(weights, flags):
        w.requires_grad_(flag)
    return {n: torch.stack([g[j] for g in out]) for j, n in enumerate(modules)}, torch.tensor(values)


def _projector(modules, d=64, seed=0):
    return KroneckerProjector({n: tuple(m.weight.shape) for n, m in modules.items()}, d, seed)


def test_hooked_sketches_equal_projected_per_example_gradients(tiny):
    model, batch = _batch(tiny)
    modules = sketched_modules(model)
    assert "lm_head" in modules and all(isinstance(m, torch.nn.Linear) for m in modules.values())
    projector = _projector(modules)
    sketches, values = Sketcher(model, modules, projector)(batch)
    grads, ref_values = _loop_gradients(model, modules, batch)
    assert torch.allclose(values, ref_values, atol=1e-5)
    assert torch.allclose(sketches, projector.project(grads), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed


def test_lora_sketches_cover_exactly_the_adapters(tiny):
    """With peft LoRA, the sketched gradient is that of the adapter weights, batched or looped."""
    from peft import LoraConfig, get_peft_model

    model, batch = _batch(tiny, 3)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    try:
        with torch.no_grad():  # peft starts B at zero; move it so that A's gradient is not zero too
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        modules = sketched_modules(lora)
        assert len(modules) == 2 * 2 * 2 and all(".lora_" in n for n in modules)  # layers × (q, v) × (A, B)
        assert sum(m.weight.numel() for m in modules.values()) == 2 * 2 * (4 * 64 + 64 * 4)
        projector = _projector(modules, d=32)
        sketches, _ = Sketcher(lora, modules, projector)(batch)
        grads, _ = _loop_gradients(lora, modules, batch)
        assert grads[next(iter(modules))].abs().sum() > 0
        assert torch.allclose(sketches, projector.project(grads), rtol=1e-4, atol=1e-6)
    finally:
        lora.unload()  # give the shared fixture model back without adapters, trainable again
        for p in model.parameters():
            p.requires_grad_(True)


def test_module_selection_by_name_and_its_errors(tiny):
    model, _ = _batch(tiny, 1)
    chosen = sketched_modules(model, ["*.mlp.*"])
    assert chosen and all(".mlp." in n for n in chosen)
    with pytest.raises(ModelError, match="matches no linear layer"):
        sketched_modules(model, ["*.nothing"])
    model.lm_head.weight.requires_grad_(False)
    try:
        with pytest.raises(ModelError, match="lm_head was not trained"):
            sketched_modules(model, ["lm_head"])
    finally:
        model.lm_head.weight.requires_grad_(True)


def test_target_sketches_are_projected_gradients_of_the_response_loss(tiny):
    """The target is sketched through its loss: the summed cross-entropy of the response tokens."""
    model, batch = _batch(tiny, 3)
    modules = sketched_modules(model)
    projector = _projector(modules)
    sketches, values = Sketcher(model, modules, projector, response_loss)(batch)
    grads, ref_values = _loop_gradients(model, modules, batch, response_loss)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    assert torch.allclose(values, (ce * batch["target_mask"][:, :-1]).sum(1), atol=1e-4)
    assert torch.allclose(values, ref_values, atol=1e-5)
    assert torch.allclose(sketches, projector.project(grads), rtol=1e-4, atol=1e-5)


def test_factored_projection_equals_projecting_the_gradient():
    projector = KroneckerProjector({"a": (6, 10), "b": (3, 5)}, 24, seed=1)
    x, g = {"a": torch.randn(2, 7, 10), "b": torch.randn(2, 7, 5)}, {"a": torch.randn(2, 7, 6), "b": torch.randn(2, 7, 3)}
    factored = projector.project_factored("a", x["a"], g["a"]) + projector.project_factored("b", x["b"], g["b"])
    full = projector.project({n: torch.einsum("bto,bti->boi", g[n], x[n]) for n in x})
    assert torch.allclose(factored, full, atol=1e-5)
    assert projector.grad_dim == 6 * 10 + 3 * 5


def test_projection_preserves_inner_products_within_jl_tolerance():
    layers = {"a": (64, 96), "b": (32, 128)}
    gen = torch.Generator().manual_seed(0)
    u = {n: torch.randn(o, i, generator=gen) for n, (o, i) in layers.items()}
    v = {n: 0.6 * u[n] + 0.8 * torch.randn(o, i, generator=gen) for n, (o, i) in layers.items()}
    exact = sum(float((u[n] * v[n]).sum()) for n in layers)
    norms = (sum(float(u[n].square().sum()) for n in layers) * sum(float(v[n].square().sum()) for n in layers)) ** 0.5
    errors = []
    for seed in range(10):
        p = KroneckerProjector(layers, 1024, seed)
        pu, pv = p.project({n: t[None] for n, t in u.items()}), p.project({n: t[None] for n, t in v.items()})
        errors.append(float(pu[0] @ pv[0]) - exact)
    assert abs(np.mean(errors)) < 0.05 * norms  # unbiased
    assert np.std(errors) < 4 / 1024**0.5 * norms  # JL-sized spread


def test_rademacher_factors_are_signs_and_fixed_across_processes():
    m = rademacher(300, 64, key=12345)
    assert set(m.unique().tolist()) == {-1.0, 1.0} and abs(float(m.mean())) < 0.05
    code = ("from dataselect.projection import rademacher; import hashlib; "
            "print(hashlib.sha256(rademacher(300, 64, key=12345).numpy().tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(m.numpy().tobytes()).hexdigest()
    assert not torch.equal(m, rademacher(300, 64, key=12346))


def test_layer_split_keeps_both_factors_large():
    assert layer_split(8, 576, 512) == (8, 64)  # LoRA A: the rank side is kept whole
    assert layer_split(576, 8, 512) == (64, 8)  # LoRA B
    assert layer_split(64, 64, 512) in {(16, 32), (32, 16)}
    assert layer_split(64, 64, 4096) == (64, 64)
