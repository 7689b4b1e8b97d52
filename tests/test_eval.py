"""sample.py --eval end to end (issue 12): E.T. Bench's 12 tasks, Charades-STA and YouCook2 (TimeIT) files and the
synthetic world, on a tiny trained checkpoint; the released prompt and question-side <evi>; a killed run that
continues; several processes; parse failures counted and shown."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import nanod2vlm.eval as ev
import sample
import train
from conftest import TINY
from nanod2vlm.eval import charades_scores, etbench_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = [{"A": "a red square", "B": "a blue circle", "C": "a green cross", "D": "a yellow diamond"}[c] for c in "ABCD"]
# one record of each task, as E.T. Bench's evi files have them: question-side <evi> for the `src` intervals
ETBENCH = [
    dict(task="rar", q="Which object appears in <evi>? (A) a red square (B) a blue circle (C) a green cross "
         "(D) a yellow diamond", src=[1, 4], o=OPTS, p=1),
    dict(task="eca", q="What happens in <evi>? Options: (A) a red square (B) a blue circle (C) a green cross "
         "(D) a yellow diamond", src=[2.5, 6.5], o=OPTS, p=0),
    dict(task="rvq", q="What is shown at <evi>? (A) a red square (B) a blue circle (C) a green cross "
         "(D) a yellow diamond", src=[3], o=OPTS, p=2),
    dict(task="tvg", q="When does the red square appear?", tgt=[2, 6]),
    dict(task="epm", q="When did I pick up the cup?", tgt=[1, 5]),
    dict(task="tal", q="Find every time the shape flashes.", tgt=[[1, 3], [5, 8]]),
    dict(task="evs", q="Summarise the video by its key moments.", tgt=[[1, 4]]),
    dict(task="vhd", q="Which moment is the highlight?", tgt=[[[2, 5]], [[3, 6]]]),
    dict(task="dvc", q="Describe every event with its start and end times.", tgt=[[0, 3], [4, 8]],
         g=["a red square appears", "a blue circle appears"]),
    dict(task="slc", q="List the steps with their times.", tgt=[[0, 3], [4, 8]], g=["add the oil", "stir well"]),
    dict(task="tem", q="When does the event after <evi> and <evi> happen?", src=[0, 2, 3, 5], tgt=[[1, 4], [6, 9]]),
    dict(task="gvq", q="What colour is the square? (A) red (B) blue (C) green (D) yellow", o=["red", "blue", "green",
         "yellow"], p=0, tgt=[2, 5]),
]
# what the scripted model answers, by task: renders as the released code does, a task without </evi> fails
SCRIPT = dict(
    rar="</evi> (B) a blue circle", eca="</evi> A", rvq="</evi> (A) a red square", tvg="</evi> The event happens in 2 - 6.",
    epm="</evi> The event happens in 2 - 6.", tal="</evi> The action happens in 1 - 3, 5 - 8.",
    evs="The key moments are 1 - 4.", vhd="</evi> The highlight is 3 - 5.",
    dvc="</evi> 0 - 3, a red square appears. 4 - 8, a blue circle appears.", slc="</evi> 0 - 3, add oil.",
    tem="</evi> It happens in 1 - 4.", gvq="</evi> A. The relevant event happens in 2 - 5.")


@pytest.fixture(scope="module")
def run(tiny_world):
    """A 4-step checkpoint of the tiny model; train.py's final evaluation on the world's test split included."""
    train.main([f"--data={tiny_world}/world", f"--out={tiny_world}/run", "--steps=4", *TINY, "--lr=1e-2",
                f"--eval_json={tiny_world}/world/test.json"])
    return tiny_world / "run"


@pytest.fixture(scope="module")
def files(tiny_world):
    """E.T. Bench, Charades-STA and YouCook2 (TimeIT) annotation files over the world's two test videos."""
    d = tiny_world / "bench"
    d.mkdir()
    recs = [dict(r, source="world", idx=i, video=f"test_000{i % 2}.mp4") for i, r in enumerate(ETBENCH)]
    (d / "etbench.json").write_text(json.dumps(recs))
    charades = [dict(image_id="test_0000.mp4", caption="a red square appears.", timestamp=[2, 6], id=0),
                dict(image_id="test_0001.mp4", caption="A blue circle appears", timestamp=[0, 4], id=1),
                dict(image_id="test_0000.mp4", caption="a green cross appears", timestamp=[1, 3], id=2)]
    (d / "charades.json").write_text(json.dumps({"annotations": charades}))
    cook = [dict(image_id="test_0000.mp4", duration=12, segments=[[0, 3], [4, 8]], pure_cap="add oil. stir well", id=0),
            dict(image_id="test_0001.mp4", duration=13, segments=[[1, 5]], pure_cap="cut the bread", id=1)]
    (d / "youcook2.json").write_text(json.dumps({"annotations": cook}))
    return d


def ask(capsys, *argv):
    capsys.readouterr()
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def lines(path):
    return [json.loads(x) for x in open(path)]


@pytest.fixture
def scripted(monkeypatch):
    """The model answers SCRIPT by the question (recognised in the prompt it gets); every call is recorded."""
    calls, load = [], sample.load_model

    def load_scripted(*args, **kw):
        model, tok, wp, state = load(*args, **kw)

        def generate(frames, times, q_ids, prompt_ids, max_new_tokens, temperature, seed=0, src=None,
                     repetition_penalty=1.0):
            prompt = tok.decode(prompt_ids)
            calls.append(dict(prompt=prompt, ids=prompt_ids, src=src, penalty=repetition_penalty, n=max_new_tokens))
            if "sentence:" in prompt:  # Charades-STA, by the caption
                said = {"red": "3 - 8 </evi> The event happens in 2 - 6.", "blue": "</evi> It happens in 2 - 6.",
                        "green": "no idea"}[next(c for c in ("red", "blue", "green") if c in prompt)]
            elif "fattoush" in prompt:  # YouCook2: its one fixed question
                said = "</evi> 0 - 3, add oil. 4 - 8, stir well."
            else:
                said = SCRIPT[next(r["task"] for r in ETBENCH if r["q"] in prompt)]
            return tok.encode(said) + [tok.end_id], []
        model.generate = generate
        return model, tok, wp, state
    monkeypatch.setattr(sample, "load_model", load_scripted)
    return calls


def test_etbench_all_tasks_both_scorers(run, files, capsys, scripted, tmp_path):
    out = tmp_path / "pred.jsonl"
    text = ask(capsys, "--eval", files / "etbench.json", "--videos", files.parent / "world" / "videos", "--ckpt", run,
               "--out", out, "--jobs=1")  # the scripted model's calls are seen in this process only
    recs, preds = json.loads((files / "etbench.json").read_text()), lines(out)
    assert preds == [dict(r, a=SCRIPT[r["task"]]) for r in recs]  # each record plus its answer as rendered
    # the released prompt: <image> and the question in the chat template, one placeholder per frame
    for c, r in zip(scripted, ETBENCH):
        assert c["prompt"].startswith("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>")
        assert c["prompt"].endswith(f"<image>\n{r['q']}<|end|>\n<|assistant|>\n")
    by = {r["task"]: c for r, c in zip(ETBENCH, scripted)}
    tok = sample.load_model(str(run))[1]
    # src reaches the model as frame spans: seconds at 1 fps rounded half to even (2.5 -> 2, 6.5 -> 6)
    assert by["rar"]["src"] == [(1, 4)] and by["eca"]["src"] == [(2, 6)] and by["rvq"]["src"] == [(3, 3)]
    assert by["tem"]["src"] == [(0, 2), (3, 5)] and by["tem"]["ids"].count(tok.evi_id) == 2  # two question <evi>
    assert by["tvg"]["src"] == []
    assert {t for t, c in by.items() if c["penalty"] == 1.2} == {"rar", "eca", "rvq"}
    assert {c["penalty"] for t, c in by.items() if t not in ("rar", "eca", "rvq")} == {1.0}
    assert {c["n"] for c in scripted} == {2048}  # the default: no real dense caption is cut short
    rows = {name.strip(): rest for name, _, rest in (line.partition(": ") for line in text.splitlines())}
    for task in [r["task"] for r in ETBENCH]:
        assert "new=(" in rows[task] and "original=(" in rows[task], text
    new, orig = (etbench_scores(preds, v) for v in ("new", "original"))
    for task, vals in new["tasks"].items():  # every task's counts, as the scorers give them
        assert f"n=1  failures={vals['failures']}" in rows[task].split("original=")[0]
        assert f"failures={orig['tasks'][task]['failures']}" in rows[task].split("original=")[1]
    assert new["tasks"]["tvg"]["F1"] == 1.0 and new["tasks"]["epm"]["F1"] == 0.75  # [2, 6] against [1, 5]: IoU 0.6
    assert "new=(F1=100  mIoU=100" in rows["tvg"] and "new=(F1=75  mIoU=60" in rows["epm"]  # in percent
    assert new["tasks"]["evs"]["failures"] == 1 and orig["tasks"]["evs"]["failures"] == 0  # no </evi>
    assert "failures=1" in rows["evs"].split("original=")[0]
    assert "Sim=not computed (--sentsim)" in rows["dvc"]
    for version, r in (("new (D²VLM's scorer)", new), ("original (E.T. Bench's)", orig)):  # the merged columns
        assert rows[f"Table 1, {version}"] == "  ".join(f"{k}={ev._fmt(k, v)}" for k, v in r["table"].items()) + \
            "  missing=none"
    # TVG 1, EPM 0.75, TAL 1, VHD 1 (the midpoint 4 of 3 - 5, or its first number 3, lies in [2, 5]); EVS without
    # </evi>: 0 in the new scorer, 1 in the original, which reads the whole answer
    assert "F1(gnd)=75" in rows["Table 1, new (D²VLM's scorer)"] and "F1(gnd)=95" in rows["Table 1, original (E.T. Bench's)"]


def test_sentsim_gives_sim_and_settles_letters(run, files, capsys, scripted, tmp_path):
    """--sentsim DIR (a tiny random BERT in the MiniLM layout, safetensors): Sim is computed, and letter answers
    that need the similarity fallback are scored with it."""
    import torch
    import transformers
    from nanod2vlm.eval import SentSim
    from nanod2vlm.tokenizer import WordPiece
    d = tmp_path / "minilm"
    d.mkdir()
    WordPiece.build(["a red square appears", "a blue circle appears", "add the oil", "stir well"], str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(open(d / "vocab.txt").read().split()), hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(d)
    text = ask(capsys, "--eval", files / "etbench.json", "--videos", files.parent / "world" / "videos", "--ckpt", run,
               "--out", tmp_path / "p.jsonl", "--sentsim", d, "--jobs=1")
    new = etbench_scores(lines(tmp_path / "p.jsonl"), "new", SentSim(d))
    rows = {name.strip(): rest for name, _, rest in (line.partition(": ") for line in text.splitlines())}
    assert new["tasks"]["dvc"]["Sim"] is not None and f"Sim={ev._fmt('', 100 * new['tasks']['dvc']['Sim'])}" in rows["dvc"]
    assert f"Sim(cap)={ev._fmt('', new['table']['Sim(cap)'])}" in rows["Table 1, new (D²VLM's scorer)"]
    assert "no_sim=0" in rows["rar"] and "no_sim=1" not in text


def test_charades_and_youcook2(run, files, capsys, scripted, tmp_path):
    vids = files.parent / "world" / "videos"
    text = ask(capsys, "--eval", files / "charades.json", "--videos", vids, "--ckpt", run, "--out", tmp_path / "c.jsonl",
               "--jobs=1")
    prompts = [c["prompt"] for c in scripted]
    assert ("find a visual event described by the sentence: 'a red square appears'. The format of your response "
            "should be: 'The event happens in <start time> - <end time>'.") in prompts[0]  # its periods stripped
    line = next(x for x in text.splitlines() if x.strip().startswith("Charades-STA:"))
    # [2, 6] for [2, 6] (IoU 1) and for [0, 4] (IoU 1/3), one answer without a span: 3 records, 2 parsed
    assert "n=3  failures=1" in line
    assert "parsed=(R@0.3=100  R@0.5=50  R@0.7=50  mIoU=0.6667)" in line
    assert "all=(R@0.3=66.67  R@0.5=33.33  R@0.7=33.33  mIoU=0.4444)" in line
    assert charades_scores([p["a"] for p in lines(tmp_path / "c.jsonl")], [[2, 6], [0, 4], [1, 3]])["failures"] == 1
    text = ask(capsys, "--eval", files / "youcook2.json", "--videos", vids, "--ckpt", run, "--out", tmp_path / "y.jsonl",
               "--jobs=1")
    assert all("densly describe all the cooking steps" in c["prompt"] for c in scripted[3:])
    line = next(x for x in text.splitlines() if x.strip().startswith("YouCook2:"))
    # video 0: both steps exactly (F1 1); video 1: [0, 3] hits its [1, 5] at IoU 0.4 > 0.3 only: P 1/2 * 1/4,
    # R 1/4, F1 2 * 0.125 * 0.25 / 0.375 = 1/6; the mean over videos (1 + 1/6) / 2
    assert "F1=58.3" in line and "METEOR=not computed (needs Java)" in line and "SODA_c=not computed (needs Java)" in line
    assert lines(tmp_path / "y.jsonl")[0]["g"] == ["add oil", "stir well"]
    with pytest.raises(SystemExit) as e:  # another file's predictions are never taken for this one's
        ask(capsys, "--eval", files / "youcook2.json", "--videos", vids, "--ckpt", run, "--out", tmp_path / "c.jsonl")
    assert f"{tmp_path}/c.jsonl: holds predictions of other records" in str(e.value.code)


def test_killed_run_continues_where_it_stopped(run, files, capsys, monkeypatch, tmp_path):
    """The real tiny model: a run killed after 5 answers (and a half-written line) continues to the file an
    uninterrupted run writes."""
    argv = ["--eval", files / "etbench.json", "--videos", files.parent / "world" / "videos", "--ckpt", run,
            "--max-new-tokens=6", "--jobs=1"]  # the kill is raised in this process
    ask(capsys, *argv, "--out", tmp_path / "whole.jsonl")
    answer, calls, alive = ev.answer, [], [5]

    def dies_after_5(*a, **k):
        calls.append(a[5])
        if len(calls) > alive[0]:
            raise KeyboardInterrupt
        return answer(*a, **k)
    monkeypatch.setattr(ev, "answer", dies_after_5)
    cut = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ask(capsys, *argv, "--out", cut)
    assert len(lines(cut)) == 5
    with open(cut, "a") as f:
        f.write('{"task": "tv')  # a kill in the middle of a line
    calls.clear()
    alive[0] = len(ETBENCH)
    text = ask(capsys, *argv, "--out", cut)
    assert len(calls) == len(ETBENCH) - 5 and f"{cut}: 5 of {len(ETBENCH)} records answered before" in text
    assert cut.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_two_processes_split_the_records(run, files, capsys, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): each rank answers records[rank::2]; rank 0 merges and scores."""
    argv = ["--eval", files / "etbench.json", "--videos", files.parent / "world" / "videos", "--ckpt", run,
            "--max-new-tokens=6", "--device=cpu"]
    one = ask(capsys, *argv, "--out", tmp_path / "one.jsonl")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample.py", *map(str, argv), "--out", str(tmp_path / "two.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("two.jsonl.rank*"))
    assert p.stdout.count("Table 1, new") == 1  # rank 0 alone scores and prints
    table = lambda s: [x for x in s.splitlines() if x.strip().startswith("Table 1")]  # noqa: E731
    assert table(p.stdout) == table(one) and len(table(one)) == 2


def test_forked_processes_answer_as_one_does(run, files, capfd, tmp_path):
    """--jobs=2 (forked processes, one thread each, each writing its own part): the predictions file one process
    writes; a video that cannot be decoded ends the run in one line per process, what was answered kept."""
    videos = tmp_path / "videos"
    shutil.copytree(files.parent / "world" / "videos", videos)
    argv = ["--eval", files / "etbench.json", "--videos", videos, "--ckpt", run, "--max-new-tokens=6"]
    ask(capfd, *argv, "--jobs=1", "--out", tmp_path / "one.jsonl")
    ask(capfd, *argv, "--jobs=2", "--out", tmp_path / "two.jsonl")
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("two.jsonl.rank*"))
    good = (videos / "test_0001.mp4").read_bytes()
    (videos / "test_0001.mp4").write_bytes(b"not a video")  # the records alternate videos: process 1 has all of it
    with pytest.raises(SystemExit) as e:
        ask(capfd, *argv, "--jobs=2", "--out", tmp_path / "bad.jsonl")
    assert str(e.value.code) == f"error: {files}/etbench.json: an evaluation process failed (its error is above); " \
                                "run again to continue"
    errors = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error: ")]
    assert errors == [f"error: {videos}/test_0001.mp4: cannot decode: Invalid data found when processing input "
                      "(not a video file, or truncated?)"]
    assert len(lines(tmp_path / "bad.jsonl.rank0")) == 6 and not lines(tmp_path / "bad.jsonl.rank1")
    (videos / "test_0001.mp4").write_bytes(good)
    assert "6 of 12 records answered before" in ask(capfd, *argv, "--jobs=2", "--out", tmp_path / "bad.jsonl")
    assert (tmp_path / "bad.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_world_through_the_same_scorers(run, tiny_world, capsys):
    """train.py's final evaluation and sample.py --eval on the world: its tasks scored as TVG, TAL, DVC and GVQ."""
    ann = tiny_world / "world" / "test.json"
    text = ask(capsys, "--eval", ann, "--ckpt", run, "--max-new-tokens=8")
    step = open(run / "latest").read().strip()
    out = run / step / "eval" / "test.jsonl"  # inside the checkpoint, not beside the annotation file
    assert f"predictions: {out}" in text and not (tiny_world / "world" / "test.predictions.json").exists()
    preds = lines(out)
    assert [p["task"] for p in preds] == [{"single": "tvg", "multi": "tal", "dense": "dvc", "qa": "gvq"}[r["task"]]
                                         for r in json.loads(ann.read_text())]
    m = json.load(open(run / step / "eval" / "test.metrics.json"))
    assert set(m) == {"single", "multi", "dense", "qa", "avg"}
    assert set(json.load(open(run / "metrics.json"))["test"]) == set(m)  # train.py's own final evaluation
    tasks = etbench_scores([p for p in preds if p["task"] != "gvq"])["tasks"]
    assert m["single"]["F1"] == pytest.approx(100 * tasks["tvg"]["F1"])
    assert m["multi"]["F1"] == pytest.approx(100 * tasks["tal"]["F1"])
    assert m["dense"]["F1"] == pytest.approx(100 * tasks["dvc"]["F1"]) and m["dense"]["Sim"] is None
    assert m["avg"]["F1(gnd)"] == pytest.approx((m["single"]["F1"] + m["multi"]["F1"]) / 2)
    for name in m:
        assert any(line.strip().startswith(f"{name}: ") for line in text.splitlines()), text


def test_world_qa_is_scored_as_gvq():
    """A right answer with its span counts for Rec; a right span with a wrong answer does not (GVQ's recall)."""
    base = dict(task="gvq", source="world", video="v.mp4", tgt=[2, 6], answer="It is red. The relevant ...")
    preds = [dict(base, idx=0, a="2 - 6 </evi> It is red. The relevant event happens in 2 - 6 ."),
             dict(base, idx=1, a="2 - 6 </evi> It is blue. The relevant event happens in 2 - 6 ."),
             dict(base, idx=2, a="It is red."),  # no </evi>: a parse failure
             dict(base, idx=3, a="</evi> It is red. The relevant event happens in 2 - 4 .")]  # IoU 0.5
    m = ev.score("world", preds)["qa"]
    assert m["Acc"] == 75 and m["failures"] == 1 and m["n"] == 4
    assert m["Rec"] == pytest.approx(100 * (1 + 0 + 0 + 3 / 4) / 4)  # thresholds 0.1/0.3/0.5 hit at IoU 0.5


def test_world_single_is_scored_per_object_too():
    """R@1 at IoU 0.5 per object asked about: a held-out split's cell split by its held-out pairs."""
    base = dict(task="tvg", source="world", video="v.mp4", tgt=[2, 6], g=["."])
    red, cross = "The red circle appears in <evi>.", "The cross appears in <evi>."
    preds = [dict(base, idx=0, answer=red, a="2 - 6 </evi> The red circle appears in 2 - 6 ."),
             dict(base, idx=1, answer=red, a="2 - 6 </evi> The red circle appears in 10 - 12 ."),  # the answer's span
             dict(base, idx=2, answer=cross, a="2 - 6 </evi> The cross appears in 2 - 5 .")]  # IoU 0.75
    m = ev.score("world", preds)["single"]
    by = {o: (v["R@0.5"], v["n"]) for o, v in m["R@1 by object"].items()}
    assert by == {"cross": (100, 1), "red circle": (50, 2)}
    assert m["all"]["R@0.5"] == pytest.approx(200 / 3)


def test_answer_renders_as_released(run):
    """Each <evi> -> "{s} - {e} " (whole seconds: at 1 fps the frame indices), </evi> kept, <|end|> cut; a frame-level pair is one span; the
    new tokens are bounded by the model's context."""
    from dataclasses import replace
    import torch
    model, tok, wp, _ = sample.load_model(str(run))
    frames, times = torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.arange(6.0)
    said = tok.encode("<evi> <evi> </evi> It happens in <evi> and <evi>.") + [tok.end_id]
    spans = [(1, 3), (4, 4), (1, 3), (4, 4)]
    asked = []

    def generate(frames, times, q_ids, prompt_ids, max_new_tokens, *a, **k):
        asked.append((len(prompt_ids), max_new_tokens))  # frame times 1.02 s after each whole second
        return said, [dict(stage=1 + (i > 1), span=s, seconds=(s[0] + 0.02, s[1] + 0.02)) for i, s in enumerate(spans)]
    model.generate = generate
    r = ev.answer(model, tok, wp, frames, times, "When?")
    assert r["raw"] == "1 - 3  4 - 4  </evi> It happens in 1 - 3  and 4 - 4 ." == r["text"]
    assert r["grounding"] == r["answer_spans"] == [(1.02, 3.02), (4.02, 4.02)] and r["captions"] == ["and", "."]
    assert asked[-1][1] == 2048
    model.cfg = replace(model.cfg, max_pos=asked[-1][0] + 5)
    ev.answer(model, tok, wp, frames, times, "When?")
    assert asked[-1][1] == 5
    model.cfg = replace(model.cfg, max_pos=asked[-1][0], evi_unit="frame")
    with pytest.raises(ValueError, match=f"the prompt takes {asked[-1][0]} positions, the model has"):
        ev.answer(model, tok, wp, frames, times, "When?")
    model.cfg = replace(model.cfg, max_pos=4096)
    spans = [(1, 1), (3, 3), (1, 1), (3, 3)]  # frame-level <evi>: a start and an end frame
    said = tok.encode("<evi> <evi> </evi> It happens in <evi> <evi>.") + [tok.end_id]
    assert ev.answer(model, tok, wp, frames, times, "When?")["raw"] == "1 -  3  </evi> It happens in 1 -  3 ."


@pytest.mark.parametrize("case", ["no --videos", "empty", "an object", "shared idx", "unknown task", "no q",
                                  "vid style"])
def test_bad_benchmark_files_get_one_clear_line(run, files, capsys, tmp_path, case):
    recs = json.loads((files / "etbench.json").read_text())
    data, words = {"no --videos": (recs, ["give it with --videos DIR"]), "empty": ([], ["no records to evaluate"]),
                   "an object": ({"records": recs}, ['TimeIT\'s {"annotations": [records]}']),
                   "shared idx": (recs + recs[:1], ["share a (task, source, idx)"]),
                   "unknown task": ([dict(recs[0], task="qa")], ["tasks ['qa'] are none of E.T. Bench's"]),
                   "no q": ([{"task": "tvg", "video": "v.mp4"}], ["not world, E.T. Bench or TimeIT", "'q'"]),
                   "vid style": ([dict(recs[0], q="What happens in <vid> - <vid>?")], ["<vid> in q"])}[case]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    videos = [] if case == "no --videos" else ["--videos", files.parent / "world" / "videos"]
    with pytest.raises(SystemExit) as e:
        ask(capsys, "--eval", ann, *videos, "--ckpt", run, "--out", tmp_path / "p.jsonl")
    assert str(e.value.code).startswith(f"error: {ann}: ") and "\n" not in str(e.value.code)
    for w in words:
        assert w in e.value.code, e.value.code


def test_the_table_runs_rows_by_seeds_and_writes_the_table_and_the_chart(tiny_world):
    """python -m nanod2vlm.eval on 2 rows x 2 seeds of a few steps (an FPO row starts from its seed's SFT run, which
    the runner adds) -> the markdown table (mean ± sd over seeds per cell, test and val) and the bar chart; run again,
    it finds every run done and retrains nothing."""
    import statistics
    import matplotlib.pyplot as plt
    out = tiny_world / "table"
    flags = [f for f in TINY if not f.startswith(("--seed", "--eval_json"))] + ["--steps=4", "--lr=1e-2"]
    argv = ["--rows=nocons,fpo", "--seeds=2", "--jobs=2", f"--out={out}", f"--data={tiny_world}/world", *flags]
    ev.main(argv)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fpo-s0", "fpo-s1", "nocons-s0", "nocons-s1",
                                                                  "sft-s0", "sft-s1"]
    state = json.load(open(out / "fpo-s1" / open(out / "fpo-s1" / "latest").read() / "state.json"))
    assert (state["train"]["init"], state["train"]["seed"], state["train"]["w_cons"]) == (f"{out}/sft-s1", 1, 10.0)
    assert json.load(open(out / "nocons-s0" / open(out / "nocons-s0" / "latest").read() / "state.json"))[
        "train"]["w_cons"] == 0
    md = (out / "table.md").read_text()
    for split, k in (("test", 0), ("val", 1)):
        f1 = [json.load(open(out / f"nocons-s{s}" / "metrics.json"))[split]["avg"]["F1(gnd)"] for s in (0, 1)]
        row = [line for line in md.splitlines() if line.startswith("| no consistency loss")][k]
        assert row.split(" | ")[2] == f"{statistics.mean(f1):.1f} ± {statistics.stdev(f1):.1f}"
    assert md.index("test split") < md.index("val split")
    assert plt.imread(out / "table.png").shape[:2] == (495, 1320)  # 12 x 4.5 inches at 110 dpi
    done = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    ev.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == done


def test_the_table_renders_the_world_its_flags_ask_for(tmp_path, capsys):
    """--world_train / --world_test size the world the runner renders for its runs (a size that is not a number stops
    with argparse's error before any rendering)."""
    flags = [f for f in TINY if not f.startswith(("--seed", "--eval_json"))] + ["--steps=1"]
    argv = ["--rows=sft", "--seeds=1", "--jobs=1", f"--out={tmp_path}/t", f"--data={tmp_path}/w", *flags]
    with pytest.raises(SystemExit) as e:
        ev.main(argv + ["--world_train=many"])
    assert e.value.code == 2 and "argument --world_train: invalid int value: 'many'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    ev.main(argv + ["--world_train=3", "--world_test", "1"])
    world = json.load(open(tmp_path / "w" / "world.json"))
    assert (world["n_train"], world["n_test"]) == (3, 1)
    assert len(os.listdir(tmp_path / "w" / "videos")) == 5  # 3 train, 1 test, 1 val
    assert (tmp_path / "t" / "table.md").exists()
