"""Annotations, the tokenised + collated batch (contract format), <evi> frame targets, and the frame cache."""
import json
import os

import pytest
import torch

import nanod2vlm.data as data
from nanod2vlm.files import InputError
from nanod2vlm.data import (ablate, FrameCache, VideoDataset, collate, frame_span, frame_targets,
                            read_annotations)
from nanod2vlm.tokenizer import Tokenizer
from test_video import make_video


def record(video="v0.mp4", duration=6.0, eg=((1.0, 2.0), (3.5, 4.4)), ir=((1.0, 2.0), (3.5, 4.4)),
           answer="<evi> <evi> </evi> The red square appears in <evi> and the blue circle in <evi>."):
    return {"video": video, "duration": duration,
            "time_gt": {"evidence_grounding": [list(s) for s in eg], "interleaved_response": [list(s) for s in ir]},
            "conversations": [{"from": "human", "value": "<image>\nLocate the red square and the blue circle."},
                              {"from": "gpt", "value": answer}]}


def test_all_malformed_records_reported_json_list(tmp_path):
    bad_dur, bad_count = record(duration=-1), record(answer="<evi> </evi> only one.")
    p = tmp_path / "ann.json"
    p.write_text(json.dumps([record(), bad_dur, record(), bad_count]))
    with pytest.raises(InputError) as e:
        read_annotations(p)
    msg = str(e.value)
    assert str(p) in msg and "record 1: 'duration'" in msg and "record 3: time_gt.evidence_grounding has 2" in msg
    assert "record 0" not in msg and "record 2" not in msg
    p.write_text(json.dumps([record(), record()]))
    assert len(read_annotations(p)) == 2


def test_every_malformed_record_is_named_with_each_of_its_problems(tmp_path):
    recs = [record(), record(eg=[(3, 2), (1, 2)]), "not an object",
            {**record(), "conversations": [{"from": "human", "value": "no image tag"}]}]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(InputError) as e:
        read_annotations(p)
    msg = str(e.value)
    assert str(p) in msg and "3 malformed" in msg
    assert "record 1: time_gt.evidence_grounding must be a list of [s, e] with 0 <= s <= e" in msg
    assert "record 2: not a JSON object" in msg
    assert "record 3: 'conversations' needs a human turn" in msg and "; 'conversations' needs a gpt" in msg


def test_a_frame_placeholder_in_the_answer_is_rejected(tmp_path):
    p = tmp_path / "ann.json"  # it would be embedded as a frame (D2VLM.embed) and attend both ways with the frames
    p.write_text(json.dumps([record(answer="<evi> <evi> </evi> <image> in <evi> and <evi>.")]))
    with pytest.raises(InputError, match="record 0: the gpt value contains <image>"):
        read_annotations(p)


def test_a_single_interval_may_be_written_flat(tmp_path):
    """Appendix B's third example writes one event as "evidence_grounding": [8.823, 11.311]: read as [[s, e]]."""
    flat = record(duration=12.0, answer="<evi> </evi> Picked them up. The relevant event happens in <evi>.")
    flat["time_gt"] = {"evidence_grounding": [8.823, 11.311], "interleaved_response": [8.823, 11.311]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps([flat, record()]))
    got = read_annotations(p)
    assert got[0]["time_gt"] == {"evidence_grounding": [[8.823, 11.311]], "interleaved_response": [[8.823, 11.311]]}
    assert got[1]["time_gt"] == record()["time_gt"]  # lists of intervals stay as they are
    flat["time_gt"]["interleaved_response"] = [11.3, 8.8]  # a flat pair is still checked like any interval
    p.write_text(json.dumps([flat]))
    with pytest.raises(InputError, match="interleaved_response must be a list of"):
        read_annotations(p)


def test_the_released_annotation_form_is_read_next_to_time_gt(tmp_path):
    """ET-Instruct: `tgt` flat seconds, pair k for the k-th <evi> of both stages; `src` flat seconds, pair m for the
    m-th <evi> of the question; a reversed pair flipped (as the official loader does); `task` kept."""
    ours = record()
    released = {k: v for k, v in ours.items() if k != "time_gt"} | dict(task="tal", tgt=[1.0, 2.0, 4.4, 3.5])
    released["conversations"] = [{"from": "human", "value": "<image>\nWhat happens in <evi> and in <evi>?"},
                                 ours["conversations"][1]]
    released["src"] = [0, 1.5, 2, 5]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps([released, ours]))
    got = read_annotations(p)
    assert got[0]["time_gt"] == ours["time_gt"] == got[1]["time_gt"]
    assert got[0]["src"] == [[0, 1.5], [2, 5]] and got[0]["task"] == "tal" and "src" not in got[1]
    bad = [released | dict(tgt=[1.0, 2.0, 3.5]), released | dict(src=[0, 1.5]), released | dict(src=[0, "1", 2, 5]),
           released | dict(tgt=[1.0, 2.0])]
    p.write_text(json.dumps(bad))
    with pytest.raises(InputError) as e:
        read_annotations(p)
    msg = str(e.value)
    assert "4 malformed" in msg and "record 0: 'tgt' must be a flat list [s1, e1, s2, e2, ...]" in msg
    assert "record 1: 'src' has 1 intervals but the human value has 2 <evi>" in msg
    assert "record 2: 'src' must be a flat list" in msg
    assert "record 3: time_gt.evidence_grounding has 1 intervals but the gpt value has 2 <evi> before </evi>" in msg


def test_frame_targets_against_loop():
    times = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert frame_targets(times, (1.5, 3.0)).tolist() == [0, 0, 1, 1, 0, 0]
    soft = frame_targets(times, (1.5, 3.0), alpha=2)
    inside = [j for j in range(6) if 1.5 <= times[j] <= 3.0]
    for j in range(6):  # d = distance in frames to the interval's frames
        d = min(abs(j - i) for i in inside)
        assert soft[j].item() == pytest.approx(2.0 ** -d)
    assert frame_span(times, (2.2, 2.4)) == (2, 2)  # no frame inside -> the nearest one
    assert frame_targets(times, (2.6, 2.7)).tolist() == [0, 0, 0, 1, 0, 0]


def tiny_world(tmp_path):
    """Two videos (6 s and 4 s, 4 fps) and an annotation file with one record each."""
    for name, n in (("v0.mp4", 24), ("v1.mp4", 16)):
        make_video(tmp_path / name, [i / 4 for i in range(n)], [50 + 5 * i for i in range(n)], rate=4)
    recs = [record(), record("v1.mp4", 4.0, eg=[(0.5, 1.0)], ir=[(0.3, 0.5)], answer="<evi> </evi> At <evi>, done.")]
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    tok = Tokenizer.nano([r["conversations"][1]["value"] for r in recs] * 5, tmp_path / "tok.model", vocab_size=300)
    q_tokenize = lambda text: [101] + [len(w) for w in text.split()] + [102]  # stands in for WordPiece
    return recs, tok, q_tokenize


def test_collated_batch(tmp_path):
    recs, tok, q_tokenize = tiny_world(tmp_path)
    ds = VideoDataset(tmp_path / "ann.json", tok, q_tokenize, FrameCache(tmp_path / "cache"), fps=2, size=32)
    b = collate([ds[0], ds[1]], tok.pad_id)
    T = [12, 8]  # 6 s and 4 s at 2 fps
    assert b["frames"].shape == (2, 12, 3, 32, 32) and b["frm_valid"].sum(1).tolist() == T
    assert b["frames"][1, 8:].abs().sum() == 0 and b["times"][0, :12].tolist() == [i / 2 for i in range(12)]
    assert b["resp_b"].tolist() == [0, 1]
    for i, r in enumerate(recs):
        ids, valid = b["ids"][i], b["valid"][i]
        resp, labels, resp_valid = b["resp"][i], b["labels"][i], b["resp_valid"][i]
        assert (ids == tok.image_id).sum() == T[i]  # one placeholder per frame
        assert tok.decode(labels[labels != -100]) == r["conversations"][1]["value"] + "<|end|>"
        assert (labels[resp_valid] == resp[resp_valid]).all() and (labels[~resp_valid] == -100).all()
        assert (ids[~valid] == tok.pad_id).all() and (resp[~resp_valid] == tok.pad_id).all()
        assert tok.decode(ids[valid]) == tok.chat("<image>" * T[i] + r["conversations"][0]["value"][7:])
        q = r["conversations"][0]["value"].replace("<image>\n", "")
        assert b["q_ids"][i, b["q_valid"][i]].tolist() == q_tokenize(q)
    assert (b["resp"][b["evi_b"], b["evi_pos"]] == tok.evi_id).all()
    assert b["evi_b"].tolist() == [0, 0, 0, 0, 1, 1]
    assert b["evi_stage"].tolist() == [1, 1, 2, 2, 1, 2] and b["evi_k"].tolist() == [0, 1, 0, 1, 0, 0]
    assert b["evi_y"].shape == (6, 12) and b["evi_span"].shape == (6, 2)
    for n in range(6):  # targets: each interval end rounded to its nearest frame (half to even), inclusive
        bi, st, k = b["evi_b"][n].item(), b["evi_stage"][n].item(), b["evi_k"][n].item()
        s, e = recs[bi]["time_gt"]["evidence_grounding" if st == 1 else "interleaved_response"][k]
        a, z = round(s * 2), min(round(e * 2), T[bi] - 1)  # 2 fps: frame t at t / 2 seconds
        y = torch.tensor([float(a <= t <= z) for t in range(T[bi])])
        assert b["evi_y"][n, :T[bi]].tolist() == y.tolist() and b["evi_y"][n, T[bi]:].sum() == 0
        assert b["evi_span"][n].tolist() == [a, z]
    assert b["src_pos"].numel() == 0 and b["src_span"].shape == (0, 2)


def test_cache_hits_without_decoding_and_misses_on_new_settings(tmp_path, monkeypatch):
    make_video(tmp_path / "v.mp4", [i / 5 for i in range(20)], [50 + 5 * i for i in range(20)], rate=5)
    calls = []
    real = data.read_video

    def read_once(*args):
        calls.append(args)
        if len(calls) > 1:
            raise AssertionError("decoded twice")
        return real(*args)

    monkeypatch.setattr(data, "read_video", read_once)
    x, t = FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=1, size=32)
    x2, t2 = FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=1, size=32)  # fresh memory, from disk
    assert torch.equal(x, x2) and torch.equal(t, t2) and x.dtype == torch.uint8 and len(calls) == 1
    mem = FrameCache()  # memory only
    monkeypatch.setattr(data, "read_video", real)
    x3, _ = mem.get(tmp_path / "v.mp4", fps=1, size=32)
    monkeypatch.setattr(data, "read_video", read_once)
    assert torch.equal(x3, x) and mem.get(tmp_path / "v.mp4", fps=1, size=32)[0] is x3  # in-memory hit, no decode
    with pytest.raises(AssertionError, match="decoded twice"):
        FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=2, size=32)  # another setting misses
    # features: encoded once, keyed by the extractor's tag
    monkeypatch.setattr(data, "read_video", real)
    encode = lambda f: f.mean((2, 3))  # (T, 3) "features" of the normalised frames
    f1, _ = FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=1, size=32, encode=encode, tag="mean")
    f2, _ = FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=1, size=32, encode=lambda f: 1 / 0, tag="mean")
    assert torch.equal(f1, f2) and f1.shape == (4, 3) and f1.dtype == torch.float32
    with pytest.raises(ZeroDivisionError):
        FrameCache(tmp_path / "c").get(tmp_path / "v.mp4", fps=1, size=32, encode=lambda f: 1 / 0, tag="other")


def test_ablations_rewrite_the_response():
    from types import SimpleNamespace
    rec = {"video": "v.mp4", "duration": 30.0,
           "time_gt": {"evidence_grounding": [[1.0, 4.5], [10.0, 12.0]], "interleaved_response": [[1.0, 4.5], [10.0, 12.0]]},
           "conversations": [{"from": "human", "value": "<image>\nLocate every time the circle flashes."},
                             {"from": "gpt", "value": "<evi> <evi> </evi> The circle flashes in <evi> and <evi>."}]}
    cfg = SimpleNamespace(interleave=False, evi_unit="event")
    r = ablate(rec, cfg)
    assert r["conversations"][1]["value"] == "<evi> <evi> </evi> The circle flashes in 1 - 4.5 and 10 - 12."
    assert r["time_gt"] == {"evidence_grounding": [[1.0, 4.5], [10.0, 12.0]], "interleaved_response": []}
    r = ablate(rec, SimpleNamespace(interleave=True, evi_unit="frame"))
    assert r["conversations"][1]["value"] == "<evi> <evi> <evi> <evi> </evi> The circle flashes in <evi> <evi> and <evi> <evi>."
    assert r["time_gt"]["interleaved_response"] == [[1.0, 1.0], [4.5, 4.5], [10.0, 10.0], [12.0, 12.0]]
    assert rec["time_gt"]["interleaved_response"] == [[1.0, 4.5], [10.0, 12.0]]  # the input is left alone


def test_frame_cache_memory_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    for i in range(3):
        make_video(tmp_path / f"v{i}.mp4", [k / 5 for k in range(20)], [50 + 5 * k + 30 * i for k in range(20)], rate=5)
    calls, real = [], data.read_video
    monkeypatch.setattr(data, "read_video", lambda *a: calls.append(a[0]) or real(*a))
    one = sum(x.nbytes for x in FrameCache().get(tmp_path / "v0.mp4", fps=1, size=32))
    cache = FrameCache(mem_gb=2.5 * one / 2**30)  # room for two videos
    for i in (0, 1, 0, 2, 0, 1):  # v1 is the least recently used when v2 comes in
        cache.get(tmp_path / f"v{i}.mp4", fps=1, size=32)
    assert [os.path.basename(p) for p in calls[1:]] == ["v0.mp4", "v1.mp4", "v2.mp4", "v1.mp4"]
    assert len(cache.mem) == 2 and cache.used == 2 * one


def test_frame_span_rounds_like_the_released_code():
    """Interval ends -> frames as released: second x fps, Python round (half to even), clamped, a reversed pair
    flipped; FPO's soft targets use the unrounded ends."""
    times = torch.arange(10.0)
    assert frame_span(times, [4.5, 6.5]) == (4, 6) and frame_span(times, [5.5, 7.4]) == (6, 7)
    assert frame_span(times, [7, 3]) == (3, 7) and frame_span(times, [8, 20]) == (8, 9)
    assert frame_span(torch.arange(10.0) / 2, [1.25, 2.0], fps=2) == (2, 4)  # 2 fps: second s is frame 2 s
    assert frame_span(torch.arange(10.0) * 1.001, [1.5, 5.5]) == (2, 6)  # 29.97 fps: seconds are frames, as released
    assert frame_span(torch.arange(10.0) * 3, [7.4, 13.5]) == (2, 4)  # a thinned video: by the frames' real times
    y = frame_targets(times, [4.5, 6.5], alpha=2.0)
    assert y[3:8].tolist() == [0.5, 1.0, 1.0, 1.0, 0.5]
    y = frame_targets(times, [4.5, 6.5], alpha=2.0, exact=True)
    assert y[3:9].tolist() == pytest.approx([2 ** -1.5, 2 ** -0.5, 1.0, 1.0, 2 ** -0.5, 2 ** -1.5])
