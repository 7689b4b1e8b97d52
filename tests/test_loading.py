"""Checkpoint loading: exact key/shape checks with one clear error, safetensors only, atomic save."""
import pytest
import torch

from nanod2vlm.model import CheckpointError, Config, Phi3, load_safetensors_into, save_safetensors

CFG = Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_mlp=128)


def model(seed):
    torch.manual_seed(seed)
    return Phi3(CFG)


def test_round_trip(tmp_path):
    src, dst = model(0), model(1)
    save_safetensors(src, tmp_path / "ck.safetensors")
    assert not (tmp_path / "ck.safetensors.tmp").exists()
    load_safetensors_into(dst, tmp_path / "ck.safetensors")
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n


def test_rename_and_skip(tmp_path):
    src, dst = model(0), model(1)
    state = {"llm." + k: v for k, v in src.state_dict().items()} | {"vision.extra": torch.zeros(3)}
    save_safetensors(state, tmp_path / "ck.safetensors")
    load_safetensors_into(dst, tmp_path / "ck.safetensors",
                          rename=lambda k: k.removeprefix("llm.") if k.startswith("llm.") else None)
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)


def test_mismatch_names_keys_and_path(tmp_path):
    state = model(0).state_dict()
    state["model.norm.weight"] = torch.ones(65)  # wrong shape
    del state["lm_head.weight"]  # missing
    state["model.bogus"] = torch.zeros(2)  # unexpected
    path = tmp_path / "bad.safetensors"
    save_safetensors(state, path)
    dst = model(1)
    before = dst.model.embed_tokens.weight.clone()
    with pytest.raises(CheckpointError) as e:
        load_safetensors_into(dst, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "lm_head.weight" in msg and "model.bogus" in msg and "model.norm.weight" in msg and "(65,)" in msg
    assert torch.equal(dst.model.embed_tokens.weight, before)  # nothing was overwritten


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_safetensors_into(model(0), path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_safetensors_into(model(0), tmp_path / "nothing_here")


def test_longrope_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"rope_scaling": {"type": "longrope"}, "num_attention_heads": 4}')
    with pytest.raises(CheckpointError, match="longrope"):
        Phi3.from_pretrained(tmp_path)
