"""The paper's scorers against numbers worked out by hand from the protocol's definitions, including every case that
separated the project's old scorers from the official ones."""
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanod2vlm.eval import (SentSim, charades_scores, cider_d, etbench_scores, parse_dvc, parse_letter,
                            parse_tvg, ptb_tokenize, youcook2_scores)
from nanod2vlm.tokenizer import WordPiece

OPTIONS = ["a man runs", "a dog sits", "a cat sleeps", "a bird flies"]


class WordOverlap:
    """A stand-in for SentSim in the scorer tests: Jaccard overlap of the word sets, so scores are hand-computable."""

    def cosine(self, a, b):
        words = lambda s: set(re.findall(r"[a-z]+", s.lower()))
        return [len(words(x) & words(y)) / len(words(x) | words(y)) for x, y in zip(a, b)]


def score(task, answers, version="new", sentsim=None, **fields):
    """One (task, source) group: a record per answer, the other fields shared (or per record when given as a list
    of per-record values under the name + 's')."""
    recs = []
    for i, a in enumerate(answers):
        r = dict(task=task, source="src", video=f"v{i}", a=a, **fields)
        for k in ("tgt", "p"):
            if f"{k}s" in fields:
                r[k] = fields[f"{k}s"][i]
        recs.append(r)
    return etbench_scores(recs, version, sentsim)["tasks"][task]


# --- parsers -------------------------------------------------------------------------------------------------

def test_parse_tvg():
    assert parse_tvg("The event happens in 10 - 20.") == [[10, 20]]
    assert parse_tvg("from 20 to 10") == [[10, 20]]  # the "to" form; answer spans are reordered
    assert parse_tvg("20 - 10", answer=False) == [[20, 10]]  # evidence spans are not
    assert parse_tvg("00:00:10 - 00:00:20") == [[0, 10]]  # the primary rule matches "10 - 00"
    assert parse_tvg("It starts at 7 s.\nIt ends at 12 s") == [[7, 12]]  # first number per sentence, paired
    assert parse_tvg("starts at 10s - 20s") == []  # the "s" breaks the primary rule and the word boundaries
    assert parse_tvg("It happens in 6.3s - 12.1s") == []  # one number in the only sentence: nothing to pair
    assert parse_tvg("happens in 3 – 8") == []  # an en dash is not a hyphen
    assert parse_tvg("happens in 5. - 8.") == [[5, 8]]  # trailing periods stripped
    assert parse_tvg("happens in 1..2 - 8") == []  # the official raises; a failure here
    assert parse_tvg("happens in 4 - 4") == [[4, 4]]  # zero length is a span


def test_parse_dvc():
    assert parse_dvc(" 3 - 8 , a man cuts onions. 10 - 15 , he fries them.") == [
        ([3, 8], "a man cuts onions."), ([10, 15], "he fries them.")]
    shifted = parse_dvc("Here are the steps: 0 - 5, cut onions. 9 - 5, fry.")  # leading text shifts the captions
    assert shifted == [([0, 5], "here are the steps:"), ([5, 9], "cut onions.")]  # 3 captions, 2 spans
    assert parse_dvc("0 - 5 seconds, chop it.. then stir") == [([0, 5], "chop it  then stir")]
    assert parse_dvc("start time: 2\nend time: 9\ndescription: wash the rice") == [([2, 9], "wash the rice")]
    # last fallback: one event from the first piece of the whole answer with a time
    fry = "at 1:30 we fry the onions"
    assert parse_dvc("nothing here", whole="intro text\n" + fry) == [([70, 110], fry)]  # 90 s +- 20
    assert parse_dvc("nothing here", whole="first, at 12 seconds add salt") == [([12, 52], "add salt")]
    assert parse_dvc("no time at all", whole="still no time") == []


def test_parse_letter():
    assert parse_letter("A man runs", 4) == (0, "a man runs")  # reads as option A
    assert parse_letter("Best option: (B) a dog", 4)[0] == 1
    assert parse_letter("c", 4)[0] == 2
    assert parse_letter("e) none", 4)[0] is None and parse_letter("e) none", 5)[0] == 4
    assert parse_letter("Dogs sit", 4)[0] is None  # second character is a letter: no option letter
    assert parse_letter("  ( ", 4) == (None, "")  # empty: a failure


def test_ptb_tokenize():
    assert ptb_tokenize("Don't cut the man's onion, (please)... 1.5 well-known!") == [
        "do", "n't", "cut", "the", "man", "'s", "onion", "please", "1.5", "well-known"]


# --- E.T. Bench, grounding -------------------------------------------------------------------------------------

TVG_ANSWERS = ["0 - 5 </evi> It happens in 0 - 5, 10 - 20.",  # new: best span 1.0; original: first span [0, 5]
               "</evi> It happens in 0 - 7.",  # IoU exactly 7/10: misses 0.7 (float32 vs Python float)
               "It happens in 10 - 20."]  # new: no </evi> is a failure; original: a hit


def test_tvg_any_span_tie_and_failures():
    new = score("tvg", TVG_ANSWERS, tgts=[[10, 20], [0, 10], [10, 20]])
    assert new["F1"] == round((1 + 0.75 + 0) / 3, 5) and new["failures"] == 1 and new["n"] == 3
    assert new["mIoU"] == pytest.approx((1 + 0.7 + 0) / 3, abs=1e-5)
    original = score("tvg", TVG_ANSWERS, "original", tgts=[[10, 20], [0, 10], [10, 20]])
    assert original["F1"] == round((0 + 0.75 + 1) / 3, 5) and original["failures"] == 0
    assert score("epm", ["</evi> 20 - 10", "</evi> 15 - 15"], tgt=[10, 20])["F1"] == 0.5  # reversed, zero length


def test_tal_any_match():
    gt2 = [[0, 10], [10, 20]]
    assert score("tal", ["</evi> 0 - 10, 0 - 10"], tgt=[[0, 10]])["F1"] == 1.0  # a duplicate is still precise
    assert score("tal", ["</evi> 0 - 20"], tgt=gt2)["F1"] == 0.75  # one span covers two GTs: IoU 0.5 each
    assert score("tal", ["</evi> 0 - 10, 10 - 20"], tgt=[[0, 20]])["F1"] == 0.75  # two spans split one GT
    assert score("tal", ["</evi> 0 - 7"], tgt=[[0, 10]])["F1"] == 1.0  # 7/10 compared in float32: hits 0.7
    # GT [0, 10], [20, 30], predictions [0, 10], [40, 50]: P = R = 1/2 at every threshold
    assert score("tal", ["</evi> 0 - 10, 40 - 50", "nothing"], tgt=[[0, 10], [20, 30]])["F1"] == 0.25


def test_tal_reset():
    perfect, zero = "</evi> 0 - 10", "</evi> 5 - 5"
    tgts = [[[0, 10]], [[5, 5]]]  # the zero-length pair has IoU 0/0 = NaN: passes the max test with P = R = 0
    assert score("tal", [perfect, zero], tgts=tgts)["F1"] == 0.0  # the sum so far is reset
    assert score("tal", [zero, perfect], tgts=tgts[::-1])["F1"] == 0.5  # reset first, then the perfect sample
    assert math.isnan(score("tal", [perfect, zero], "original", tgts=tgts)["F1"])


def test_evs_union_bug_rounding_and_denominator():
    assert score("evs", ["20 - 30 </evi> 0 - 10"], tgt=[[0, 10]])["F1"] == round(2 / 3, 5)  # evidence in the map
    assert score("evs", ["</evi> 0 - 10"], tgt=[[0, 10]])["F1"] == 1.0
    assert score("evs", ["30 - 20 </evi> 0 - 10"], tgt=[[0, 10]])["F1"] == 1.0  # reversed evidence marks nothing
    # bins [round(s), round(e)), half to even: GT [0.5, 2.5] -> bins 0, 1; prediction 1 - 2 -> bin 1: P 1, R 1/2
    assert score("evs", ["</evi> 1 - 2"], tgt=[[0.5, 2.5]])["F1"] == round(2 / 3, 5)
    assert score("evs", ["</evi> 0 - 10, 20 - " + "9" * 400], tgt=[[0, 10]])["F1"] == 1.0  # an infinite end is dropped
    r = score("evs", ["</evi> 0 - 10", "</evi> no span"], tgt=[[0, 10]])  # failures leave the denominator
    assert r["F1"] == 1.0 and r["failures"] == 1


def test_vhd_midpoint_vs_first_number():
    a = ["3 - 8 </evi> The highlight is at 5 - 17."]
    annotators = [[[0, 1]], [[10, 12]]]
    assert score("vhd", a, tgt=annotators)["F1"] == 1.0  # midpoint 11 lies in the second annotator's span
    assert score("vhd", a, "original", tgt=annotators)["F1"] == 0.0  # the first number, 3
    assert score("vhd", ["</evi> at 11"], tgt=[[10, 12]])["failures"] == 1  # one number is no span for P-TVG


def test_tem_first_span():
    gt = [[10, 20], [30, 40]]
    assert score("tem", ["</evi> 0 - 5, 30 - 40"], tgt=gt)["Rec"] == 0.0  # only the first span counts
    assert score("tem", ["</evi> 30 - 40, 0 - 5"], tgt=gt)["Rec"] == 1.0  # the best of the GT spans
    assert score("tem", ["</evi> 30 - 37"], tgt=gt)["Rec"] == 0.75  # 7/10 misses 0.7


# --- E.T. Bench, answers ---------------------------------------------------------------------------------------

def test_gvq_recall_needs_the_right_answer():
    a = ["10 - 20 </evi> B. The relevant event happens in 10 - 20.",  # right span, wrong answer: no recall
         "10 - 20 </evi> A. The relevant event happens in 10 - 20.",
         "10 - 20 </evi> A. The relevant event happens in 10 - 17."]  # right answer, 7/10 span
    r = score("gvq", a, o=OPTIONS, p=0, tgt=[10, 20])
    assert r["Acc"] == round(2 / 3, 5) and r["Rec"] == round((0 + 1 + 0.75) / 3, 5)


def test_letters_new_vs_original():
    a = ["A man runs", "(B) a man runs", " ( "]  # A; B (wrong); empty
    new = score("rar", a, sentsim=WordOverlap(), o=OPTIONS, p=0)
    assert new["Acc"] == round(1 / 3, 5) and new["failures"] == 1
    original = score("rar", a, "original", sentsim=WordOverlap(), o=OPTIONS, p=0)  # rescued by the similarity
    assert original["Acc"] == round(2 / 3, 5)
    assert score("rar", a, "original", o=OPTIONS, p=0)["no_sim"] == 1  # without SentSim: counted, a miss
    # "I pick (a)": the original's "(x)" search finds it; the new scorer's is dead, similarity decides
    assert score("eca", ["I pick (a)"], "original", o=OPTIONS, p=0)["Acc"] == 1.0
    assert score("eca", ["I pick (a)"], o=OPTIONS, p=0) == {"Acc": 0.0, "no_sim": 1, "n": 1, "failures": 0}
    assert score("rvq", ["3 - 8 </evi> the dog sits"], sentsim=WordOverlap(), o=OPTIONS, p=1)["Acc"] == 1.0


# --- E.T. Bench, captioning ------------------------------------------------------------------------------------

DVC = [dict(tgt=[[0, 10], [20, 30]], g=["a man cuts onions", "he fries them"],
            a="0 - 10 </evi> 0 - 10, a man cuts onions."),  # P 1, R 1/2
       dict(tgt=[[0, 10]], g=["a man cuts onions"],
            a="x </evi> 0 - 10, a man cuts onions. 50 - 60, a dog runs away."),  # P 1/2, R 1
       dict(tgt=[[0, 10]], g=["a man cuts onions"], a="0 - 10, a man cuts onions.")]  # no </evi>: a failure


def dvc(samples, version="new", sentsim=WordOverlap()):
    recs = [dict(task="dvc", source="src", video=f"v{i}", **s) for i, s in enumerate(samples)]
    return etbench_scores(recs, version, sentsim)["tasks"]["dvc"]


def test_dvc_dataset_level_f1_and_sim():
    two = dvc(DVC[:2])
    assert two["F1"] == 0.75  # F1 of the mean P = R = 3/4 (the mean of per-sample F1s would be 2/3)
    assert two["Sim"] == 0.75  # v0: 1; v1: (1 + 0 for the random string) / 2
    three = dvc(DVC)
    assert three["F1"] == 0.5 and three["Sim"] == 0.75 and three["failures"] == 1  # P, R scaled by 2/3; Sim is not
    assert dvc(DVC, "original")["F1"] == round(2 * (2.5 / 3) * (2.5 / 3) / (5 / 3), 5)  # whole answers parse
    assert dvc(DVC[:1], sentsim=None)["Sim"] is None
    # IoU 5/(10 + 1e-8) is just below 0.5: detection counts at 0.1 and 0.3 only
    half = dvc([dict(tgt=[[0, 10]], g=["a man cuts onions"], a="</evi> 0 - 5, a man cuts onions.")])
    assert half["F1"] == 0.5 and half["Sim"] == 0.5
    dup = dvc([dict(tgt=[[0, 10]], g=["a man cuts onions"], a="</evi> 0 - 10, a man cuts. 0 - 10, a man cuts onions.")])
    assert dup["F1"] == 1.0 and dup["Sim"] == 0.875  # any-match: a duplicate is precise; Sim (3/4 + 1) / 2


def test_etbench_aggregation():
    o, g = OPTIONS, ["a man cuts onions"]
    recs = [dict(task="rar", o=o, p=1, a="B"), dict(task="eca", o=o, p=0, a="A"), dict(task="rvq", o=o, p=2, a="(C) x"),
            dict(task="tvg", tgt=[10, 20], a="10 - 20 </evi> The event happens in 10 - 20."),
            dict(task="tvg", tgt=[10, 20], a="</evi> nothing", source="other"),  # TVG: mean over sources 1, 0
            dict(task="epm", tgt=[0, 10], a="</evi> 0 - 5"),
            dict(task="tal", tgt=[[0, 10], [20, 30]], a="</evi> 0 - 10, 20 - 30"),
            dict(task="evs", tgt=[[0, 10]], a="0 - 10 </evi> 0 - 10"),
            dict(task="vhd", tgt=[[10, 12]], a="</evi> 10 - 12"),
            dict(task="dvc", tgt=[[0, 10]], g=g, a="</evi> 0 - 10, a man cuts onions"),
            dict(task="slc", tgt=[[0, 10]], g=g, a="</evi> 0 - 5, a man cuts onions"),
            dict(task="tem", tgt=[[0, 10], [30, 40]], a="</evi> 30 - 40"),
            dict(task="gvq", o=o, p=0, tgt=[0, 10], a="0 - 10 </evi> A. It happens in 0 - 10.")]
    recs = [dict(dict(source="src", video="v"), **r) for r in recs]
    r = etbench_scores(recs, sentsim=WordOverlap())
    assert r["tasks"]["tvg"]["F1"] == 0.5 and r["tasks"]["tvg"]["n"] == 2 and r["missing"] == []
    assert r["columns"] == {"RAR": 100.0, "EVC": 100.0, "RVQ": 100.0, "TVG": 50.0, "EPM": 75.0, "TAL": 100.0,
                            "EVS": 100.0, "VHD": 100.0, "DVC F1": 100.0, "DVC Sim": 100.0, "SLC F1": 50.0,
                            "SLC Sim": 50.0, "TEM Rec": 100.0, "GVQ Rec": 100.0}
    assert r["table"] == {"Acc(ref)": 100.0, "F1(gnd)": 85.0, "F1(cap)": 75.0, "Sim(cap)": 75.0, "Rec(com)": 100.0}
    partial = etbench_scores([x for x in recs if x["task"] != "tem"])  # no TEM, no SentSim
    assert partial["missing"] == ["tem"] and partial["columns"]["TEM Rec"] is None
    assert partial["table"]["Rec(com)"] is None and partial["table"]["Sim(cap)"] is None
    assert partial["table"]["F1(gnd)"] == 85.0
    with pytest.raises(ValueError, match="unknown E.T. Bench task"):
        etbench_scores([dict(recs[0], task="xyz")])


# --- Charades-STA, YouCook2 ------------------------------------------------------------------------------------

def test_charades_two_denominators():
    preds = ["3 - 8 </evi> The event happens in 0 - 10.",  # IoU 1
             "</evi> The event happens in 5 - 15.",  # IoU 5 / 15
             "20 - 10 </evi> The event happens somewhere.",  # evidence span as written: reversed, IoU 0
             "I do not know."]  # a failure
    r = charades_scores(preds, [[0, 10], [0, 10], [10, 20], [0, 10]])
    assert r["n"] == 4 and r["failures"] == 1
    assert r["parsed"] == pytest.approx({"R@0.3": 200 / 3, "R@0.5": 100 / 3, "R@0.7": 100 / 3, "mIoU": 4 / 9})
    assert r["all"] == pytest.approx({"R@0.3": 50.0, "R@0.5": 25.0, "R@0.7": 25.0, "mIoU": 1 / 3})


def slow_cider(pairs, n=4, sigma=6.0):
    """CIDEr-D straight from its formula, one n-gram at a time over the union vocabulary."""
    N, out = len(pairs), []
    for h, r in pairs:
        total = 0.0
        for k in range(1, n + 1):
            grams = lambda w: [tuple(w[i:i + k]) for i in range(len(w) - k + 1)]
            vocab = set(grams(h)) | set(grams(r))
            df = {x: sum(x in grams(ref) for _, ref in pairs) for x in vocab}
            gh = {x: grams(h).count(x) * math.log(N / max(1, df[x])) for x in vocab}
            gr = {x: grams(r).count(x) * math.log(N / max(1, df[x])) for x in vocab}
            num = sum(min(gh[x], gr[x]) * gr[x] for x in vocab)
            den = math.sqrt(sum(v * v for v in gh.values())) * math.sqrt(sum(v * v for v in gr.values()))
            total += num / den if den else num
        penalty = math.exp(-((max(len(h) - 1, 0) - max(len(r) - 1, 0)) ** 2) / (2 * sigma ** 2))
        out.append(10 * total / n * penalty)
    return out


def test_cider_d():
    pairs = [("a man cuts the onions".split(), "a man cuts onions".split()),
             ("he fries them".split(), "he fries the onions in a pan".split()),
             ("add salt".split(), "add some salt and pepper".split())]
    assert cider_d(pairs) == pytest.approx(slow_cider(pairs), rel=1e-12)
    assert min(cider_d(pairs)) > 0
    assert cider_d(pairs[:1]) == [0.0]  # a single pair: idf log 1 - log 1 = 0


def test_youcook2():
    gts = {"v1": [([0, 10], "a man cuts the onions"), ([20, 30], "he fries them")],
           "v2": [([0, 10], "add salt")], "v3": [([0, 10], "add salt")]}
    preds = {"v1": "0 - 10 </evi> 0 - 10, a man cuts onions. 0 - 7, he fries them.",  # IoU ~1 and 0.7 - eps
             "v3": "0 - 10, no delimiter"}  # v2: no prediction; v3: a failure
    r = youcook2_scores(preds, gts)
    # v1: P per t in 0.3/0.5/0.7/0.9 = 1, 1, 1/2, 1/2 -> 3/4; R = 1/2 at every t -> F1 = 2 (3/4)(1/2) / (5/4) = 0.6
    assert r["F1"] == 20.0
    assert r["failures"] == 1 and r["missing"] == 1 and r["METEOR"] is None and r["SODA_c"] is None
    # v1 CIDEr: both predictions pair with the first GT at 0.3 and 0.5; at 0.7 and 0.9 the second pairs with a
    # random string, which shares no n-gram with anything
    cut, fry, ref = "a man cuts onions".split(), "he fries them".split(), "a man cuts the onions".split()
    low, high = slow_cider([(cut, ref), (fry, ref)]), slow_cider([(cut, ref), (fry, ["qzxqzxqzxq"])])
    assert r["CIDEr"] == round(100 * (2 * sum(low) / 2 + 2 * sum(high) / 2) / 4 / 3, 1)


# --- SentSim ---------------------------------------------------------------------------------------------------

TEXTS = ["A man cuts onions.", "he fries them in a pan", "x", "the man cuts the onions and fries them " * 3]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A tiny random BertModel saved by transformers in HF format, with a WordPiece vocab."""
    d = tmp_path_factory.mktemp("minilm")
    vocab = WordPiece.build(TEXTS, str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab.vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(d)
    return d, model, vocab


def test_sentsim_matches_bertmodel(minilm):
    d, model, vocab = minilm
    sim = SentSim(d)
    ids = [sim.ids(t) for t in TEXTS]
    L = max(map(len, ids))
    tok = torch.tensor([x + [vocab.pad_id] * (L - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in ids])
    with torch.no_grad():
        h = model(input_ids=tok, attention_mask=mask).last_hidden_state
    ref = torch.nn.functional.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert torch.allclose(sim(TEXTS), ref, atol=1e-5)
    assert sim.cosine(TEXTS[:2], TEXTS[:2]) == pytest.approx([1.0, 1.0], abs=1e-6)
    # through the DVC scorer: one prediction matched at every threshold, PTB-tokenised captions
    r = dvc([dict(tgt=[[0, 10]], g=["A man cuts onions."], a="</evi> 0 - 10, he fries them in a pan!")], sentsim=sim)
    assert r["Sim"] == round(float(sim(["he fries them in a pan"]) @ sim(["a man cuts onions"]).T), 5)


def test_sentsim_prefixed_keys_and_right_truncation(minilm, tmp_path):
    d, model, vocab = minilm
    for f in ("config.json", "vocab.txt"):
        (tmp_path / f).write_text((d / f).read_text())
    state = load_file(str(d / "model.safetensors"))
    save_file({"0.auto_model." + k: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    short = SentSim(tmp_path, max_len=8)
    assert torch.allclose(short(TEXTS), SentSim(d, max_len=8)(TEXTS))
    hf = transformers.BertTokenizer(str(d / "vocab.txt"))
    assert short.ids(TEXTS[3]) == hf(TEXTS[3], truncation=True, max_length=8)["input_ids"]  # keeps the start
