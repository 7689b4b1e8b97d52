"""The benchmark runs end to end (smoke test at toy sizes: no timing is asserted), and its FLOP count means what the
MFU figure needs."""
import argparse
import json
import math

import pytest
import torch

from nanod2vlm import bench

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
    assert [r[0].split(" (")[0] for r in bench.ROWS] == [
        "gpu D2VLM SFT step time", "gpu D2VLM SFT step tokens/s", "gpu D2VLM SFT MFU", "gpu D2VLM SFT peak memory",
        "gpu Phi-3 LoRA step time, ours", "gpu Phi-3 LoRA step time, transformers + peft",
        "gpu Phi-3 LoRA speed-up, ours / transformers + peft"]
    assert all(math.isfinite(r[1]) for r in bench.ROWS) and bench.ROWS[2][1] > 0  # MFU: FLOPs were counted


def test_count_flops_sees_forward_and_backward_matmuls():
    """MFU's numerator: a frozen weight costs 2 FLOPs per token forward + 2 for the input gradient, a trained one
    2 more for its weight gradient (the count the MFU figure relies on)."""
    n, d = 10, 16
    frozen, trained = torch.nn.Linear(d, d, bias=False).requires_grad_(False), torch.nn.Linear(d, d, bias=False)
    x = torch.randn(n, d, requires_grad=True)
    assert bench.count_flops(lambda: trained(frozen(x)).sum().backward()) == n * d * d * (4 + 6)
