"""Preference synthesis: each perturbation changes exactly what its label says, on hand-written records."""
import json
import random

import pytest

from synth import TOKEN, apply, build_vocab, candidates, distort, main, parse, render, synth, word_class


def record(task, dur, ivs, answer, question="<image>\nWhen?"):
    return {"video": f"videos/{task}.mp4", "duration": dur, "task": task,
            "time_gt": {"evidence_grounding": ivs, "interleaved_response": ivs},
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


RECORDS = [
    record("single", 30.0, [[4.0, 9.5]], "<evi> </evi> The red square flashes in <evi>."),
    record("multi", 30.0, [[2.0, 5.0], [10.0, 14.0], [20.0, 26.0]],
           "<evi> <evi> <evi> </evi> The blue circle spins in <evi>, <evi>, and <evi>."),
    record("dense", 40.0, [[0.0, 6.0], [6.0, 15.0], [18.0, 29.0]],
           "<evi> <evi> <evi> </evi> <evi>, a red square appears. <evi>, a green triangle flashes. "
           "<evi>, a blue circle spins."),
    record("qa", 20.0, [[5.0, 12.0]], "<evi> </evi> 3 times. The yellow diamond flashes in <evi>."),
    record("qa", 20.0, [[1.0, 4.0]], "<evi> </evi> 2 times. The purple cross spins in <evi>."),
]
VOCAB = build_vocab(RECORDS)


def ivs(ev):
    return [(s, e) for s, e, _ in ev]


def texts(ev):
    return [c for _, _, c in ev]


def check_in_bounds_and_ordered(ev, dur):
    assert all(0 <= s < e <= dur for s, e, _ in ev) and ivs(ev) == sorted(ivs(ev))


def test_parse_render_round_trip_and_chunks():
    for rec in RECORDS:
        assert render(parse(rec))["value"] == rec["conversations"][1]["value"]
    assert texts(parse(RECORDS[2])) == ["<evi>, a red square appears.", "<evi>, a green triangle flashes.",
                                        "<evi>, a blue circle spins."]
    assert texts(parse(RECORDS[1])) == ["The blue circle spins in <evi>,", "<evi>, and", "<evi>."]
    assert parse(record("bad", 30.0, [[1.0, 2.0]], "<evi> <evi> </evi> Twice: <evi>.")) is None
    no_gt = record("plain", 30.0, [], "</evi> Nothing to ground.")
    del no_gt["time_gt"]  # read_annotations accepts a record without time_gt and without <evi>; synth skips it
    assert parse(no_gt) is None


def test_each_perturbation_changes_only_what_it_says():
    seen = set()
    for rec in RECORDS:
        ev, dur = parse(rec), rec["duration"]
        for sub, cands in candidates(ev, dur, VOCAB, None).items():
            for seed in range(10):
                rej, ks, rks = apply(sub, ev, cands, dur, random.Random(seed), VOCAB, None)
                check_in_bounds_and_ordered(rej, dur)
                assert rej != ev
                seen.add(sub)
                if sub == "shift":
                    assert ks == rks and ks and texts(rej) == texts(ev)
                    assert [k for k in range(len(ev)) if rej[k][:2] != ev[k][:2]] == ks
                elif sub == "add":
                    (i,) = rks
                    assert ks == [] and rej[:i] + rej[i + 1:] == ev  # all original events kept
                    s, e = rej[i][:2]
                    assert all(min(e, e2) <= max(s, s2) for s2, e2, _ in ev)  # overlaps no event
                elif sub == "delete":
                    (k,) = ks
                    assert rks == [] and rej == ev[:k] + ev[k + 1:]
                elif sub == "merge":
                    k = ks[0]
                    assert ks == [k, k + 1] and rks == [k] and rej[:k] + rej[k + 1:] == ev[:k] + ev[k + 2:]
                    assert rej[k][:2] == (ev[k][0], max(ev[k][1], ev[k + 1][1])) and rej[k][2] == ev[k][2]
                elif sub == "distort":
                    assert ks == rks and ks and ivs(rej) == ivs(ev)
                    assert [k for k in range(len(ev)) if rej[k][2] != ev[k][2]] == ks
                    for k in ks:  # exactly one word differs, swapped for a word of the same class
                        a, b = TOKEN.findall(ev[k][2]), TOKEN.findall(rej[k][2])
                        diff = [(x, y) for x, y in zip(a, b) if x != y]
                        assert len(a) == len(b) and len(diff) == 1
                        assert word_class(diff[0][0]) == word_class(diff[0][1]) is not None
                        b = [w.lower() for w in b]  # ... and the new sentence's adjacent word pairs all occur
                        assert set(zip(b, b[1:])) <= VOCAB["pairs"]
                else:  # repeat
                    assert ks == rks and ks and ivs(rej) == ivs(ev)
                    assert all(rej[k][2] == rej[k - 1][2] for k in ks)
                    assert all(rej[k] == ev[k] for k in range(len(ev)) if k not in ks)
    assert seen == {"shift", "add", "delete", "merge", "distort", "repeat"}


def test_shift_moves_enough():
    ev = parse(RECORDS[0])
    for seed in range(20):
        rej, _, _ = apply("shift", ev, [0], 30.0, random.Random(seed), VOCAB, None)
        assert abs(rej[0][0] - ev[0][0]) >= 1.5 - 0.01 or abs(rej[0][1] - ev[0][1]) >= 1.5 - 0.01


def test_synth_pairs_are_consistent():
    counts_all = set()
    for seed in range(30):
        pairs, counts = synth(RECORDS, seed)
        counts_all |= set(counts)
        assert len(pairs) == len(RECORDS) and sum(counts.values()) == len(RECORDS)
        for p in pairs:
            assert p["rejected"] != p["chosen"]
            for side in ("chosen", "rejected"):
                value, tg = p[side]["value"], p[side]["time_gt"]
                stage1, stage2 = value.split("</evi>")
                n = len(tg["evidence_grounding"])
                assert stage1.count("<evi>") == stage2.count("<evi>") == n == len(tg["interleaved_response"])
                assert tg["evidence_grounding"] == sorted(tg["evidence_grounding"])
                assert all(0 <= s < e <= p["duration"] for s, e in tg["evidence_grounding"])
            assert p["factor"] == ("textual" if p["sub_factor"] in ("distort", "repeat") else "temporal")
    assert {"temporal/shift", "temporal/add", "temporal/delete", "temporal/merge", "textual/distort",
            "textual/repeat"} <= counts_all


def test_cli_is_deterministic(tmp_path, capsys):
    src = tmp_path / "records.json"
    src.write_text(json.dumps(RECORDS + [RECORDS[1] | {"duration": 35.0}]))
    bad = record("bad", 30.0, [[1.0, 2.0]], "<evi> </evi> Twice: <evi>.")  # well formed, but the two stages
    bad["time_gt"]["interleaved_response"] = [[3.0, 4.0]]                   # ground different events
    (tmp_path / "train.json").write_text(json.dumps(RECORDS + [bad]))
    main([str(src), str(tmp_path / "a.json"), "--seed", "3"])
    main([str(src), str(tmp_path / "b.json"), "--seed", "3"])
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert len(json.loads((tmp_path / "a.json").read_text())) == len(RECORDS) + 1
    capsys.readouterr()
    main([str(tmp_path / "train.json"), str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "skipped (stages, time_gt or order do not line up)" in out and f"wrote {len(RECORDS)} pairs" in out
    assert any(line.startswith(("temporal/", "textual/")) for line in out.splitlines())


def test_a_bad_annotation_file_stops_with_its_name(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(SystemExit, match="^error: .*x.json"):
        main([str(tmp_path / "x.json"), str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_an_llm_distortion_is_kept_only_with_exactly_one_evi():
    rng, chunk = random.Random(0), "The red square flashes in <evi>."
    assert distort(chunk, rng, VOCAB, llm=lambda c: " The blue square flashes in <evi>. ") == \
        "The blue square flashes in <evi>."
    for answer in ("The blue square flashes.", "<evi> and <evi>", ""):
        assert distort(chunk, rng, VOCAB, llm=lambda c: answer) == chunk
    ev = parse(record("qa", 20.0, [[1.0, 4.0]], "<evi> </evi> <evi>."))  # no content word to swap ...
    assert "distort" not in candidates(ev, 20.0, VOCAB, None)
    assert candidates(ev, 20.0, VOCAB, lambda c: c)["distort"] == [0]  # ... but an LLM may still rewrite it


def test_distort_never_invents_a_combination_the_corpus_lacks():
    """"red square" and "blue circle" occur, "red circle" and "blue square" do not (think: a held-out pair): no
    distortion of "The red square flashes" may say them; "green square" and "square spins" occur, so they may."""
    recs = [record("a", 9.0, [[1.0, 2.0]], "<evi> </evi> The red square flashes in <evi>."),
            record("b", 9.0, [[1.0, 2.0]], "<evi> </evi> The blue circle flashes in <evi>."),
            record("c", 9.0, [[1.0, 2.0]], "<evi> </evi> The green square spins in <evi>.")]
    vocab = build_vocab(recs)
    outs = {distort("The red square flashes in <evi>.", random.Random(s), vocab) for s in range(40)}
    assert outs == {"The green square flashes in <evi>.", "The red square spins in <evi>."}
