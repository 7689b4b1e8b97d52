"""train.py end to end on a tiny rendered world and a tiny model (issue 4): the loss falls, two processes equal one
with twice the gradient accumulation, kill-and-resume is exact, bad checkpoints fail clearly, FPO runs."""
import hashlib
import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import synth
import train
from nanod2vlm.data import read_annotations
from nanod2vlm.files import InputError
from conftest import TINY

TINY = TINY + ["--grad_accum=1", "--warmup=0"]
SFT = ["--steps=8", "--ckpt_every=4", "--lr=1e-2"]  # the reference run: checkpoints at steps 4 and 8


@pytest.fixture(scope="module")
def tmp(tiny_world):
    return tiny_world


def run(tmp, out, *args):
    """train.py in this process -> the history of its last checkpoint."""
    train.main([f"--data={tmp}/world", f"--out={tmp}/{out}", *TINY, *args])
    return history(tmp / out)


def read_state(ckpt):
    with open(os.path.join(ckpt, "state.json")) as f:
        return json.load(f)


def history(out):
    return read_state(os.path.join(out, open(os.path.join(out, "latest")).read()))["history"]


@pytest.fixture(scope="module")
def sft(tmp):
    return run(tmp, "sft", *SFT)


def test_the_nano_tokenizer_learns_the_prompt_as_the_decoder_reads_it(tmp):
    """Trained on the questions in the chat template, the sentencepiece model writes the system prompt in whole words,
    not in the byte-level pieces of text it never saw; WordPiece (the Q-Former's) learns no template words."""
    run, _, _ = train.parse([f"--data={tmp}/world"])
    tok, wp = train.build_tokenizers(run)
    system = tok.encode("You are a helpful AI assistant.")
    assert [tok.decode([i]) for i in system] == ["You", " are", " a", " helpful", " AI", " assistant", "."]
    assert "assistant" not in wp.vocab and "square" in wp.vocab


def test_a_few_steps_lower_the_loss(tmp, sft):
    losses = [h["loss"] for h in sft]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    # every step of the reference run sees a different batch of 2, so its curve is noisy; on one fixed batch (all
    # 24 samples, one epoch per step, unbucketed) each step must lower L = L_sft + 10 L_gnd + L_cons, by 2 in all
    n = len(read_annotations(tmp / "world" / "train.json"))
    full = [h["loss"] for h in run(tmp, "full-batch", "--steps=8", f"--batch_size={n}", "--lr=1e-2", "--bucket=0")]
    assert all(b < a for a, b in zip(full, full[1:])) and full[-1] < full[0] - 2.0, full


def test_bucketed_batches_hold_the_streams_samples_sorted_by_length():
    """--bucket: a window of batches holds exactly the samples the plain stream holds there, cut into batches of
    neighbouring lengths, in a seeded order; still a pure function of the batch number (resume, torchrun)."""
    n, bs, w = 50, 4, 8
    lengths = [(7 * i) % 23 for i in range(n)]
    plain = [train.batch_indices(g, n, bs, 0) for g in range(2 * w)]
    bucketed = [train.batch_indices(g, n, bs, 0, lengths, w) for g in range(2 * w)]
    for k in (0, w):  # each window
        assert sorted(sum(plain[k:k + w], [])) == sorted(sum(bucketed[k:k + w], []))
        spans = sorted((min(lengths[j] for j in b), max(lengths[j] for j in b)) for b in bucketed[k:k + w])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # the batches do not overlap in length
        firsts = [min(lengths[j] for j in b) for b in bucketed[k:k + w]]
        assert firsts != sorted(firsts)  # not shortest first
    assert train.batch_indices(11, n, bs, 0, lengths, w) == bucketed[11]


def test_two_processes_equal_one_with_twice_the_accumulation(tmp):
    args = [f"--data={tmp}/world", *TINY, "--steps=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", f"--out={tmp}/ddp", *args], cwd=os.path.dirname(train.__file__), env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    ddp = history(tmp / "ddp")
    one = run(tmp, "accum", "--steps=3", "--grad_accum=2")
    assert [h.keys() for h in ddp] == [h.keys() for h in one] and len(one) == 3
    for a, b in zip(ddp, one):  # every logged part of every step: the same data, the same averaged gradients
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, ddp, one)


def files(folder):
    """{relative path: sha1 of the bytes} of everything under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(folder) for f in fs}


def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp, sft):
    # the state of a run killed during step 7 (after the step-4 checkpoint, while writing step 8)
    killed = tmp / "killed"
    shutil.copytree(tmp / "sft", killed)
    shutil.rmtree(killed / "step-000008")
    (killed / "step-000008.tmp").mkdir()
    (killed / "step-000008.tmp" / "model.safetensors").write_bytes(b"half written")
    (killed / "latest").write_text("step-000004")
    resumed = run(tmp, "killed", *SFT, "--resume")
    # steps 5-8 need the restored weights (step 5), Adam moments and step count, the LR schedule, the data order
    assert resumed == sft  # exact: the same ops on the same data, in one thread
    a, b = files(tmp / "sft"), files(killed)
    assert sorted(b) == sorted(a)  # the half-written folder is gone
    for f in ("step-000008/model.safetensors", "step-000008/optim.safetensors"):
        assert a[f] == b[f], f  # bit-identical weights and optimizer state


@pytest.fixture(scope="module")
def other(tmp):
    """A checkpoint of another config (n_embd 48) whose files we put into a good run."""
    run(tmp, "other", "--steps=1", "--n_embd=48")
    return tmp / "other" / "step-000001"


CASES = {  # what is wrong with the last checkpoint (step 8): (file, how to spoil it, words the message must have)
    "truncated weights": ("model.safetensors", "truncate", "not a readable safetensors file"),
    "state.json not JSON": ("state.json", b'{"step": 8, "conf', "not a nanod2vlm checkpoint"),
    "weights of another config": ("model.safetensors", "other", "shape mismatches"),
    "truncated optimizer": ("optim.safetensors", "truncate", "optim.safetensors"),
    "optimizer of another config": ("optim.safetensors", "other", "shape"),
}


@pytest.mark.parametrize("case, flag", [(c, f) for c in CASES for f in ("--resume", "--init")
                                        if f == "--resume" or CASES[c][0] != "optim.safetensors"])  # --init: no optim
def test_a_bad_checkpoint_stops_with_a_clear_error_and_changes_nothing(tmp, sft, other, monkeypatch, case, flag):
    name, spoil, words = CASES[case]
    out = tmp / f"bad-{case.replace(' ', '-')}-{flag[2:]}"
    shutil.copytree(tmp / "sft", out)
    bad = out / "step-000008" / name
    if spoil == "truncate":
        bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    elif spoil == "other":
        shutil.copy(other / name, bad)
    else:
        bad.write_bytes(spoil)
    before = files(out)
    ckpt = [f"--init={out}/step-000008", "--steps=12"] if flag == "--init" else ["--resume"]  # (its own steps)
    argv = [f"--data={tmp}/world", f"--out={out}", *TINY, *SFT, *ckpt]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(train.__file__, run_name="__main__")  # as `python train.py ...` runs it
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: "), msg  # a message for the user, not a traceback
    assert str(out / "step-000008") in msg and words in msg, msg
    if spoil == "other":
        assert "checkpoint (48" in msg and "model (32" in msg, msg  # the shapes that differ
    assert files(out) == before  # the last good checkpoints (steps 4 and 8's good files) are untouched


def test_fpo_from_the_sft_run_lowers_its_loss(tmp, sft):
    """The --stage=fpo default, the released objective: SFT terms on the chosen response + Eq. (4), no reference."""
    pairs, _ = synth.synth(read_annotations(tmp / "world" / "train.json"), seed=0)
    # the batch is every pair (one epoch per step, unbucketed), so each step's loss and margin are measured on the
    # same data
    hist = run(tmp, "fpo", "--stage=fpo", f"--init={tmp}/sft", f"--batch_size={len(pairs)}", "--steps=4", "--lr=1e-2",
               "--bucket=0", "--seed=1")
    # train.py ran synth.py, whose pairs are the world's (synth.py's seed 0), whatever the run's --seed
    assert json.load(open(tmp / "world" / "fpo_pairs.json")) == pairs
    assert all(math.isfinite(h["fpo"]) and math.isfinite(h["margin"]) for h in hist)
    # the total falls at every step and the preference term ends below where it began (the SFT terms dominate the
    # total at this scale: 0.87 -> 0.83 of 12.2 -> 9.9 at this seed; the mean margin is not what Eq. (4) optimises)
    losses = [h["loss"] for h in hist]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert hist[-1]["fpo"] < hist[0]["fpo"], hist
    for h in hist:  # the total is the SFT terms (released weights 10 / 10) plus the preference term
        assert h["loss"] == pytest.approx(h["sft"] + 10 * h["gnd"] + 10 * h["cons"] + h["fpo"], rel=1e-5)
    state = read_state(tmp / "fpo" / "step-000004")
    assert state["config"]["n_embd"] == 32 and state["train"]["init"] == f"{tmp}/sft"  # the SFT run's model
    assert (state["train"]["beta"], state["train"]["w_gnd"], state["train"]["w_cons"], state["train"]["soft_alpha"]) \
        == (0.1, 10.0, 10.0, 2.0)


def test_fpo_kill_and_resume_reproduces_the_uninterrupted_run(tmp, sft):
    fpo = ["--stage=fpo", f"--init={tmp}/sft", "--steps=4", "--ckpt_every=2", "--lr=1e-2"]
    whole = run(tmp, "fpo-whole", *fpo)
    shutil.copytree(tmp / "fpo-whole", tmp / "fpo-killed")
    shutil.rmtree(tmp / "fpo-killed" / "step-000004")
    (tmp / "fpo-killed" / "latest").write_text("step-000002")
    assert run(tmp, "fpo-killed", *fpo, "--resume") == whole


def test_a_model_flag_that_the_init_contradicts_is_refused(tmp, sft):
    """--init brings its checkpoint's model: a flag asking for another is an error, not silently dropped; one that
    agrees with it (the table runner gives its flags to the FPO runs too) is fine."""
    with pytest.raises(SystemExit) as e:
        run(tmp, "fpo-contradicts", "--stage=fpo", f"--init={tmp}/sft", "--steps=1", "--n_layer=2", "--evi_capture=0")
    msg = e.value.code
    assert msg.startswith(f"error: {tmp}/sft brings its own model") and "--n_layer=2 (the checkpoint's: 1)" in msg, msg
    assert "--evi_capture=False (the checkpoint's: True)" in msg and "n_embd" not in msg, msg  # TINY's agree
    with pytest.raises(SystemExit) as e:  # the nano preset's own value is a flag too: the checkpoint has 1 layer
        run(tmp, "fpo-contradicts", "--stage=fpo", f"--init={tmp}/sft", "--steps=1", "--n_layer=4")
    assert "--n_layer=4 (the checkpoint's: 1)" in e.value.code, e.value.code
    assert not (tmp / "fpo-contradicts").exists()


def test_vit_cache_trains_on_cached_features_with_the_same_losses(tmp, sft):
    """--vit_cache (the default): the frozen tower encoded each video once, into {data}/cache keyed by a hash of its
    weights; a run that encodes the frames in every step instead has the same losses (up to float summation order)."""
    cache = tmp / "world" / "cache"
    uncached = run(tmp, "no-vit-cache", *SFT, "--vit_cache=false")
    for a, b in zip(uncached, sft):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (uncached, sft)
    new = [f for f in os.listdir(cache) if "_vit" in f]
    n_videos = len({r["video"] for r in read_annotations(tmp / "world" / "train.json")})
    assert len(new) == n_videos + 1  # and the learning picture's held-out video
    from safetensors.torch import load_file
    x = load_file(cache / new[0])["x"]
    assert x.dim() == 3 and x.shape[1:] == (4, 16)  # (T, patches of a 16² frame in 8² patches, vit_width)


def test_compile_gives_the_eager_losses(tmp, sft):
    """--compile (torch.compile, dynamic shapes: every batch has other lengths) runs the same steps as eager mode,
    without recompiling for each new length. The slowest test (~1 min, compiling on the CPU); it caught an inductor
    stride bug that eager tests cannot."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run(tmp, "compiled", *SFT, "--compile")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert len(compiled) == len(sft) == 8
    # the forward's two graphs (one graph break), compiled once for all lengths (take_along_dim's shape
    # specialization recompiled them at each new prompt length: 6 graphs here); one more if two lengths coincide
    assert graphs <= 3, graphs
    for a, b in zip(compiled, sft):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (compiled, sft)


def test_full_fpo_presets_need_an_init():
    """--config=full --stage=fpo: the released FPO's gradient accumulation 8 and full-scale rates, from the SFT run
    given by --init (the nano FPO default init, runs/nano, would be the wrong model)."""
    t, _, _ = train.parse(["--config=full", "--stage=fpo", "--init=runs/full"])
    assert (t.init, t.grad_accum, t.lr, t.batch_size, t.w_cons) == ("runs/full", 8, 2e-5, 1, 10.0)
    with pytest.raises(InputError, match="--init"):  # train.main prints it as one line (files.cli)
        train.parse(["--config=full", "--stage=fpo"])
    assert train.parse(["--stage=fpo"])[0].init == "runs/nano"


def test_every_seed_trains_on_the_same_world(tmp):
    """A missing world is rendered from the world's own seed (0), not the training seed: --seed=1 on a fresh
    machine trains on the videos that seed 0 and the README's runs train on."""
    fresh = tmp / "fresh"
    train.main([f"--data={fresh}", f"--out={tmp}/fresh-run", *TINY, "--seed=1", "--steps=1", "--world_train=2",
                "--world_test=1"])
    world = json.load(open(fresh / "world.json"))
    assert (world["seed"], world["n_train"], world["n_test"]) == (0, 2, 1)
    assert read_state(os.path.join(tmp, "fresh-run", "step-000001"))["train"]["seed"] == 1


def test_the_learning_picture(tmp, sft):
    """A run draws learning.png: the losses, and one held-out question's first-<evi> similarity to every frame at
    steps 0, 1/16, 1/8, 1/4, 1/2 and the end, kept in the checkpoints' state so that a resumed run draws them all."""
    import matplotlib.pyplot as plt
    probes = read_state(os.path.join(tmp / "sft", open(tmp / "sft" / "latest").read()))["probes"]
    assert [step for step, _ in probes] == [0, 1, 2, 4, 8]  # of 8 steps
    curves = [p for _, p in probes]
    assert len({len(p) for p in curves}) == 1 and len(curves[0]) >= 10  # every frame of the held-out video
    assert all(0 < x < 1 for p in curves for x in p) and curves[0] != curves[-1]  # training moved the curve
    assert plt.imread(tmp / "sft" / "learning.png").shape[:2] == (440, 1430)  # 13 x 4 inches at 110 dpi
