import math

import numpy as np
import torch

from dataselect.model import encode, pad_batch, trainable_parameters
from dataselect.sketch import Projector, log_odds, output_function, per_example_gradients, per_token_gradients


def test_log_odds_is_stable_and_exact():
    p = torch.tensor([1e-30, 1e-8, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    got = log_odds(p.log())
    naive = torch.log(p / (1 - p))
    assert torch.allclose(got, naive, rtol=1e-6)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-12, -200.0]))).all()


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


def test_batched_per_example_gradients_match_a_loop(tiny):
    model, batch = _batch(tiny)
    grads, values = per_example_gradients(model, batch)
    params = trainable_parameters(model)
    for i in range(len(values)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        f = output_function(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits,
                            one["input_ids"], one["target_mask"])[0]
        loop = torch.autograd.grad(f, list(params.values()))
        assert math.isclose(f.item(), values[i].item(), rel_tol=1e-5)
        for (name, _), g in zip(params.items(), loop):
            assert torch.allclose(grads[name][i], g, atol=1e-6, rtol=1e-4), name


def test_per_token_gradients_average_to_the_example_gradient(tiny):
    model, batch = _batch(tiny, 2)
    grads, values = per_example_gradients(model, batch)
    tgrads, tvalues = per_token_gradients(model, batch)
    count = batch["target_mask"].sum(1)
    assert torch.allclose(tvalues.sum(1) / count, values, atol=1e-5)
    for name in grads:
        mean = tgrads[name].sum(1) / count.view(-1, *[1] * (tgrads[name].dim() - 2))
        assert torch.allclose(mean, grads[name], atol=1e-6, rtol=1e-4), name


def test_projector_is_seeded_blockwise_and_linear():
    sizes = {"a": 50, "b": 30}
    p1, p2, other = Projector(sizes, 16, seed=3), Projector(sizes, 16, seed=3, cache_bytes=0), Projector(sizes, 16, 4)
    g = {"a": torch.randn(5, 5, 10), "b": torch.randn(5, 30)}
    dense = torch.cat([p1.block("a"), p1.block("b")])  # the p × d matrix it never builds
    flat = torch.cat([g["a"].reshape(5, -1), g["b"]], dim=1)
    assert torch.allclose(p1.project(g), flat @ dense, atol=1e-5)
    assert torch.equal(p1.project(g), p2.project(g))  # cached or regenerated: same numbers
    assert not torch.allclose(p1.project(g), other.project(g))
    assert torch.equal(dense.abs(), torch.full_like(dense, 1 / 4))  # Rademacher ±1/√d


def test_projection_preserves_inner_products_on_average():
    sizes = {"w": 4000}
    x, y = torch.randn(1, 4000), torch.randn(1, 4000)
    y = 0.6 * x + 0.8 * y
    sketches = [Projector(sizes, 512, seed=s).project({"w": torch.cat([x, y])}) for s in range(8)]
    est = np.mean([float(s[0] @ s[1]) for s in sketches])
    assert abs(est - float(x[0] @ y[0])) < 0.1 * float(x.norm() * y.norm())


def test_lora_sketches_differentiate_only_the_adapters(tiny):
    """With peft LoRA, the gradient covers exactly the adapter weights, batched or looped."""
    from peft import LoraConfig, get_peft_model

    model, batch = _batch(tiny, 3)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts B at zero; move it so that A's gradient is not zero too
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    params = trainable_parameters(lora)
    assert params and all("lora_" in n for n in params)
    assert sum(p.numel() for p in params.values()) == 2 * 2 * (4 * 64 + 64 * 4)  # layers × (q, v) × (A + B)
    grads, values = per_example_gradients(lora.eval(), batch)
    one = {k: v[1:2] for k, v in batch.items()}
    f = output_function(lora(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits,
                        one["input_ids"], one["target_mask"])[0]
    for (name, _), g in zip(params.items(), torch.autograd.grad(f, list(params.values()))):
        assert torch.allclose(grads[name][1], g, atol=1e-6, rtol=1e-4), name
    lora.unload()  # give the shared fixture model back without adapters
