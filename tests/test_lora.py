"""Hand-written LoRA: zero start, the merged weight, trainable set, HF keys still load (a LoRA run's checkpoint round
trip: tests/test_full_path.py)."""
import torch
import transformers

from nanod2vlm.checkpoint import load_safetensors_into
from nanod2vlm.model import Config, LoRALinear, Phi3, add_lora, build_mask, mark_trainable

CFG = Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_mlp=128, lora_r=4, lora_alpha=8.0)


def run(model, x):
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    return model(x, torch.arange(x.size(1)).expand(x.size(0), -1), build_mask(valid))[0]


def lora_model(seed=0):
    torch.manual_seed(seed)
    return add_lora(Phi3(CFG), CFG).eval()


def test_wraps_targets_only_and_zero_b_is_exact():
    torch.manual_seed(0)
    base = Phi3(CFG).eval()
    x = torch.randn(2, 7, 64)
    ref = run(base, x)
    model = add_lora(base, CFG)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("qkv_proj", "o_proj")}
    assert model.model.layers[0].self_attn.qkv_proj.scale == 2.0
    assert torch.equal(run(model, x), ref)


def test_merged_weight_computes_what_the_adapter_does():
    """An export writes W + (alpha / r) B A in place of each LoRA layer: a plain Phi-3 with those weights gives the
    adapted model's output."""
    model = lora_model()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    x = torch.randn(2, 7, 64)
    out = run(model, x)
    plain = Phi3(CFG).eval()
    sd = model.state_dict()
    sd.update({f"{n}.weight": m.merged() for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    plain.load_state_dict({k: v for k, v in sd.items() if "lora_" not in k})
    assert not torch.allclose(plain.model.layers[1].self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)
    assert torch.allclose(run(plain, x), out, atol=1e-5)


def test_mark_trainable():
    model = lora_model()
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))}
    assert len(lora) == 2 * 2 * 2
    assert trainable == lora | {"model.embed_tokens.weight", "lm_head.weight"}  # the decoder's part of is_adapter


def test_lora_model_loads_hf_base_keys(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=128, rope_scaling=None, pad_token_id=0, eos_token_id=2))
    hf.save_pretrained(tmp_path)
    model = lora_model()
    load_safetensors_into(model, tmp_path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.weight, hf.model.layers[0].self_attn.qkv_proj.weight)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
