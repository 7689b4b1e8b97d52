"""The benchmark runs end to end (smoke test at toy sizes: no timing is asserted), and its MFU formula agrees with
PyTorch's own FLOP counter."""
import argparse
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanod2vlm import bench
from nanod2vlm.loss import L_sft
from nanod2vlm.model import Config, Phi3, add_lora, build_mask, mark_trainable

NAMES = ["generate: same greedy ids", "generate tokens/s, ours", "generate tokens/s, transformers",
         "generate speed-up", "train: |loss ours - loss transformers|", "train step tokens/s, ours",
         "train step tokens/s, transformers + peft", "train speed-up", "decoder forward per token",
         "<evi> work per <evi> token", "<evi> share of a decode step", "frm_head over 8 frames",
         "read_video at 1 fps", "decode every frame", "read_video speed-up"]


def test_runs_end_to_end_and_prints_every_row(tmp_path, capsys):
    threads = torch.get_num_threads()
    rows = bench.main(["--tiny", "--steps", "1", "--json", str(tmp_path / "b.json")])
    torch.set_num_threads(threads)  # main sets 1; leave the other tests as they were
    out = capsys.readouterr().out
    table = out[out.index("\nfigure"):]
    assert len(rows) == len(NAMES)
    for (name, value, *_), want in zip(rows, NAMES):
        assert name.startswith(want) and name in table and math.isfinite(value) and value >= 0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in saved] == [r[0] for r in rows]
    # the side-by-side comparisons are of the same model: same greedy ids, same initial loss
    assert saved[0]["result"] == "PASS" and saved[4]["result"] == "PASS"


def test_gpu_part_without_cuda_exits_with_a_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--only", "gpu"])


def test_gpu_step_code_runs_on_cpu():
    bench.ROWS.clear()
    bench.bench_gpu(argparse.Namespace(tiny=True, steps=1), dev="cpu")
    assert [r[0].split(",")[0] for r in bench.ROWS][:3] == ["gpu Phi-3 step time", "gpu Phi-3 step tokens/s",
                                                            "gpu Phi-3 MFU"]
    assert all(math.isfinite(r[1]) for r in bench.ROWS)


def test_step_flops_matches_flop_counter():
    """FlopCounterMode sees the matmuls (not the CPU attention kernel). Their count is the formula minus the
    attention term, minus what autograd skips in layer 0: its qkv input gradient (2 n 3C^2 + 2 n r C), since the
    input embeddings need no gradient. Both differences are exact, so the match is too."""
    cfg = Config(vocab_size=100, n_embd=64, n_layer=3, n_head=4, n_mlp=96, lora_r=4, lora_alpha=8.0)
    model = add_lora(Phi3(cfg), cfg)
    mark_trainable(model)
    n, C = 20, cfg.n_embd
    with FlopCounterMode(display=False) as counter:
        logits = model(torch.randn(1, n, C), torch.arange(n)[None], build_mask(torch.ones(1, n, dtype=torch.bool)))[0]
        L_sft(logits, torch.randint(0, 100, (1, n))).backward()
    flops, N, N_lora = bench.step_flops(model, n)
    assert N == cfg.n_layer * (4 * C * C + 3 * C * cfg.n_mlp) + C * cfg.vocab_size
    assert N_lora == cfg.n_layer * cfg.lora_r * 6 * C
    attention, skipped = 12 * cfg.n_layer * C * n * n, 2 * n * (3 * C * C + cfg.lora_r * C)
    assert counter.get_total_flops() == flops - attention - skipped
