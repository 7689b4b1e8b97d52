"""sample.py on a rendered synthetic video with a freshly trained tiny checkpoint (issue 6): text, JSON and plot
output, --eval, and a clear message (never a traceback) for each bad input or misbehaving model."""
import json
import random
import shutil

import pytest

import sample
import train
from conftest import TINY, force

TINY = TINY + ["--lr=1e-2"]
Q = "When does the red square appear?"


@pytest.fixture(scope="module")
def tmp(tiny_world):
    """The tiny world and a 4-step checkpoint of the tiny model."""
    train.main([f"--data={tiny_world}/world", f"--out={tiny_world}/run", "--steps=4", *TINY])
    return tiny_world


def video(tmp):
    return str(tmp / "world" / "videos" / "test_0000.mp4")


def duration(tmp):
    return json.load(open(tmp / "world" / "test.json"))[0]["duration"]


def ask(capsys, *argv):
    capsys.readouterr()
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_json_and_plot(tmp, capsys):
    png = tmp / "out.png"
    out = ask(capsys, video(tmp), Q, "--ckpt", tmp / "run", "--json", "--plot", png, "--max-new-tokens=16")
    r = json.loads(out)  # one valid JSON object, nothing else on stdout
    assert 10 <= r["frames"] <= 15  # 10-14 s at 1 fps
    assert isinstance(r["text"], str) and isinstance(r["raw"], str)
    for s, e in r["grounding"] + r["answer_spans"]:
        assert 0 <= s <= e <= duration(tmp)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def scripted(monkeypatch, script):
    """Make sample.load_model's model say `script(tok)` (a list of ids) whatever it sees, then <|end|>."""
    load = sample.load_model

    def load_scripted(*args, **kw):
        model, tok, wp, state = load(*args, **kw)
        force(model, tok, script(tok))
        return model, tok, wp, state
    monkeypatch.setattr(sample, "load_model", load_scripted)


def test_prints_grounding_and_answer_spans(tmp, capsys, monkeypatch):
    scripted(monkeypatch, lambda tok: [tok.evi_id, tok.evi_end_id] + tok.encode(" It appears in <evi>."))
    png = tmp / "spans.png"
    out = ask(capsys, video(tmp), Q, "--ckpt", tmp / "run", "--plot", png, "--gt=3-8.5").splitlines()
    assert out[0].startswith("grounding: ") and out[1].startswith("answer:    It appears in ")
    spans = [out[0].removeprefix("grounding: "), out[1].removeprefix("answer:    It appears in ").removesuffix(".")]
    for span in spans:  # "3.0s - 8.0s"
        s, e = (float(x.removesuffix("s")) for x in span.split(" - "))
        assert 0 <= s <= e <= duration(tmp)
    assert out[2].endswith(f"; plot: {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # with one sigmoid(sim) panel per <evi>


def test_eval_prints_metrics_and_writes_predictions(tmp, capsys):
    ann = tmp / "world" / "test.json"
    out = ask(capsys, "--eval", ann, "--ckpt", tmp / "run", "--max-new-tokens=8")
    step = tmp / "run" / open(tmp / "run" / "latest").read().strip()
    preds = step / "eval" / "test.jsonl"  # in the checkpoint: the annotation folder may be read-only
    p = [json.loads(line) for line in open(preds)]
    records = json.load(open(ann))
    tasks = {r["task"] for r in records}
    m = json.load(open(step / "eval" / "test.metrics.json"))
    assert set(m) == tasks | {"avg"} and len(p) == len(records)
    gnd = [m[t]["F1"] for t in ("single", "multi") if t in tasks]  # the paper's F1(gnd): here TVG and TAL
    assert m["avg"]["F1(gnd)"] == pytest.approx(sum(gnd) / len(gnd))
    assert m["avg"]["F1(cap)"] == m["dense"]["F1"] and m["avg"]["Sim(cap)"] is m["dense"]["Sim"] is None
    for task in tasks | {"avg"}:
        assert any(line.strip().startswith(f"{task}: ") for line in out.splitlines()), out
    assert f"predictions: {preds}" in out


@pytest.fixture(scope="module")
def bad(tmp):
    """Inputs that must fail with a clear message: each -> (argv without --ckpt, checkpoint, words in the message)."""
    (tmp / "random.mp4").write_bytes(random.Random(0).randbytes(4000))
    other, run, v = tmp / "other", tmp / "run", video(tmp)
    train.main([f"--data={tmp}/world", f"--out={other}", "--steps=1", *TINY, "--n_embd=48"])
    step = open(run / "latest").read()
    cut, mixed = tmp / "cut", tmp / "mixed"
    for d in (cut, mixed):
        shutil.copytree(run, d)
    w = cut / step / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    shutil.copy(other / "step-000001" / "model.safetensors", mixed / step / "model.safetensors")
    return {
        "missing video": ([tmp / "nope.mp4", Q], run, [f"{tmp}/nope.mp4", "file not found"]),
        "random bytes": ([tmp / "random.mp4", Q], run, [f"{tmp}/random.mp4", "cannot decode"]),
        "empty question": ([v, "  "], run, ["non-empty question"]),
        "no question": ([v], run, ["non-empty question"]),
        "weights of another config": ([v, Q], mixed, [f"{mixed}/step-", "shape mismatches", "(48,), model (32,)"]),
        "folder without state.json": ([v, Q], tmp / "world", [f"{tmp}/world", "state.json"]),
        "truncated weights": ([v, Q], cut, [f"{cut}/step-", "not a readable safetensors file"]),
        "missing eval file": (["--eval", tmp / "nope.json"], run, [f"{tmp}/nope.json", "not found"]),
    }


@pytest.mark.parametrize("case", ["missing video", "random bytes", "empty question", "no question",
                                  "weights of another config", "folder without state.json", "truncated weights",
                                  "missing eval file"])  # the keys of `bad`
def test_bad_input_gives_a_clear_message(tmp, bad, capsys, case):
    argv, ckpt, words = bad[case]
    with pytest.raises(SystemExit) as e:
        ask(capsys, *argv, "--ckpt", ckpt)
    out, err = capsys.readouterr()
    msg = e.value.code if isinstance(e.value.code, str) else err  # sys.exit(message), or argparse's usage error
    assert e.value.code != 0 and "Traceback" not in out + err
    for w in words:
        assert w in msg, msg


def test_a_model_that_never_closes_grounding(tmp, capsys, monkeypatch):
    scripted(monkeypatch, lambda tok: [tok.evi_id] * 3 + tok.encode(" appears"))
    r = json.loads(ask(capsys, video(tmp), Q, "--ckpt", tmp / "run", "--json"))
    assert len(r["grounding"]) == 3 and r["answer_spans"] == []
    assert r["text"].endswith(" (the model never closed grounding)")
    line = ask(capsys, video(tmp), Q, "--ckpt", tmp / "run").splitlines()[1]  # the printout keeps the note whole
    assert line.startswith("answer:    ") and line.endswith(" appears (the model never closed grounding)"), line


def test_more_evi_than_frames(tmp, capsys, monkeypatch):
    n = 40  # a 10-14 s video has at most 15 frames at 1 fps
    scripted(monkeypatch, lambda tok: [tok.evi_id, tok.evi_end_id] + [tok.evi_id] * n)
    r = json.loads(ask(capsys, video(tmp), Q, "--ckpt", tmp / "run", "--json", f"--max-new-tokens={n + 3}"))
    assert len(r["answer_spans"]) == n > r["frames"]
    assert all(0 <= s <= e <= duration(tmp) for s, e in r["answer_spans"])
    assert f"{n + 1} <evi> for {r['frames']} frames" in r["text"]


def test_evi_spelled_in_bytes_is_text_not_a_reference(tmp, capsys, monkeypatch):
    """The byte-fallback pieces <0x3C> e v i > decode to the text "<evi>" but are no <evi> token: no span for them."""
    def script(tok):
        spelled = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in b"<evi>"]
        return [tok.evi_id, tok.evi_end_id] + tok.encode(" in ") + spelled
    scripted(monkeypatch, script)
    r = json.loads(ask(capsys, video(tmp), Q, "--ckpt", tmp / "run", "--json"))
    assert "<evi>" in r["raw"].split("</evi>")[1] and len(r["evis"]) == 1
    assert r["text"].endswith("</evi> in <evi>")


@pytest.mark.parametrize("mode", ["event", "frame", "text"])  # the default, and the Tab. 6 / Tab. 4 ablations
def test_dense_captions_follow_their_answer_spans(tmp, monkeypatch, mode):
    from dataclasses import replace
    from nanod2vlm.data import read_video
    said = {"event": "<evi> <evi> </evi> <evi> A red square appears. <evi> A blue circle appears.",
            "frame": "<evi> <evi> <evi> <evi> </evi> <evi> <evi> A red square appears. <evi> <evi> A blue circle appears.",
            "text": "<evi> <evi> </evi> 1 - 4 A red square appears. 6 - 9.5 A blue circle appears."}[mode]
    scripted(monkeypatch, lambda tok: tok.encode(said))
    model, tok, wp, _ = sample.load_model(str(tmp / "run"))
    model.cfg = replace(model.cfg, evi_unit="frame" if mode == "frame" else "event", interleave=mode != "text")
    frames, times = read_video(video(tmp), model.cfg.fps, model.cfg.img_size, model.cfg.max_frames)
    r = sample.answer(model, tok, wp, frames, times, "Describe the events in the video.")
    assert r["captions"] == ["A red square appears.", "A blue circle appears."], r
    assert len(r["answer_spans"]) == len(r["grounding"]) == 2
    if mode == "text":
        assert r["answer_spans"] == [(1.0, 4.0), (6.0, 9.5)]
