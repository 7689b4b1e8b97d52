"""Factorized preference data synthesis (paper Sec. 5, Appendix D): perturb one factor of a ground-truth
response at the event level; the original is "chosen", the perturbed one "rejected".

    python synth.py [IN.json] [OUT.json] --seed 0 [--llm PHI3_DIR]

A response "<evi> ... <evi> </evi> text with <evi> references" is read as events: event k = its interval
(the same in both stages) + its stage-2 chunk (the text around its <evi> reference). Per record: one factor
(temporal or textual) uniformly among the applicable ones, then one applicable sub-factor uniformly, then
events. temporal: shift, add (a false event), delete, merge (adjacent events); textual: distort (swap a
content word for another of its class, keeping every adjacent word pair one the corpus has; the paper prompts
an LLM), repeat (the previous event's text).
Pair fields "events"/"rejected_events" index the perturbed events in each response: shift/distort/repeat
[k]/[k], add []/[new], delete [k]/[], merge [k, k+1]/[k]. Both sides are re-rendered with single spaces.
"""
import argparse
import json
import random
import re
from collections import Counter

from nanod2vlm.data import read_annotations, turns
from nanod2vlm.files import cli, writable, write_atomic

# word classes of the synthetic world; a word swaps only for one of its class seen in the data
LEXICON = {"colour": "red green blue yellow purple orange black white", "shape": "square circle triangle cross diamond",
           "action": "appears flashes spins", "action_base": "appear flash spin"}
CLASS_OF = {w: c for c, words in LEXICON.items() for w in words.split()}
FACTORS = {"temporal": ("shift", "add", "delete", "merge"), "textual": ("distort", "repeat")}
TOKEN = re.compile(r"<evi>|[A-Za-z]+|\d+")
LLM_PROMPT = ("Rewrite this sentence with one key detail (a colour, shape, action or number) changed. "
              "Keep <evi> exactly as it is. Reply with the sentence only.\n{chunk}")


def parse(rec):
    """Record -> events [(s, e, chunk)] in temporal order; None if the stages and time_gt do not line up."""
    value = turns(rec)["gpt"]
    if value.count("</evi>") != 1:
        return None
    stage1, stage2 = value.split("</evi>")
    gt = rec.get("time_gt", {})
    tg = [[list(map(float, iv)) for iv in gt.get(k, [])] for k in ("evidence_grounding", "interleaved_response")]
    if not (stage1.count("<evi>") == stage2.count("<evi>") == len(tg[0]) >= 1) or tg[0] != tg[1]:
        return None
    # cut between two <evi> at the last sentence end, else just before the next <evi>; head/tail join the ends
    pos = [m.start() for m in re.finditer("<evi>", stage2)]
    cuts = [0] + [a + ([m.end() for m in re.finditer(r"[.!?](?=\s)", stage2[a:b])] or [b - a])[-1]
                  for a, b in zip(pos, pos[1:])] + [len(stage2)]
    ev = [(s, e, stage2[i:j].strip()) for (s, e), i, j in zip(tg[0], cuts, cuts[1:])]
    return ev if valid(ev, rec["duration"]) else None


def valid(ev, dur):
    return all(0 <= s <= e <= dur for s, e, _ in ev) and [x[:2] for x in ev] == sorted(x[:2] for x in ev)


def render(ev):
    """Events -> {"value", "time_gt"}: the K stage-1 <evi>, </evi>, the stage-2 chunks."""
    ivs = [[s, e] for s, e, _ in ev]
    value = " ".join(["<evi>"] * len(ev) + ["</evi>"] + [c for _, _, c in ev])
    return {"value": value, "time_gt": {"evidence_grounding": ivs, "interleaved_response": [list(x) for x in ivs]}}


def build_vocab(records):
    """What a distortion may say: the words of each class as they occur in the responses ({class: sorted words},
    digit numbers as class "number") and every pair of adjacent words the responses contain."""
    responses = [[w.lower() for w in TOKEN.findall(turns(rec)["gpt"])] for rec in records]  # their words, in order
    words = {}
    for w in sorted({w for ws in responses for w in ws if word_class(w)}):
        words.setdefault(word_class(w), []).append(w)
    return {"words": words, "pairs": {p for ws in responses for p in zip(ws, ws[1:])}}


def word_class(w):
    return "number" if w.isdigit() else CLASS_OF.get(w.lower())


def swappable(chunk, vocab):
    """[(word match, its replacements)]: other words of its class that keep both neighbouring word pairs seen in
    the corpus, so the distortion stays a plausible sentence (the paper's LLM writes sensible text) and never
    invents a combination the corpus lacks (a held-out colour-shape pair would otherwise become a negative)."""
    ms = list(TOKEN.finditer(chunk))
    out = []
    for j, m in enumerate(ms):
        prev, nxt = (ms[i].group().lower() if 0 <= i < len(ms) else None for i in (j - 1, j + 1))
        reps = [w for w in vocab["words"].get(word_class(m.group()), ()) if w != m.group().lower()
                and (prev is None or (prev, w) in vocab["pairs"]) and (nxt is None or (w, nxt) in vocab["pairs"])]
        if reps:
            out.append((m, reps))
    return out


def distort(chunk, rng, vocab, llm=None):
    """Swap one content word for a plausible other of its class (or ask the --llm hook; kept only with one <evi>)."""
    if llm:
        out = llm(chunk).strip()
        return out if out.count("<evi>") == 1 else chunk
    m, reps = rng.choice(swappable(chunk, vocab))
    new = rng.choice(reps)
    return chunk[:m.start()] + (new.capitalize() if m.group()[0].isupper() else new) + chunk[m.end():]


def shift_ranges(ev, k, dur):
    """Offsets of at least max(20% of the length, 1.5 s) that keep the start between the neighbours' starts
    and at most half the interval clipped off at the video's ends."""
    s, e, _ = ev[k]
    L = e - s
    m = max(0.2 * L, 1.5)  # the smallest offset
    lo = max(-s - L / 2, ev[k - 1][0] - s if k else -dur)
    hi = min(dur - e + L / 2, ev[k + 1][0] - s if k + 1 < len(ev) else dur)
    return [(a, b) for a, b in ((lo, -m), (m, hi)) if b > a]


def gaps(ev, dur):
    """Free time of at least 1 s between events: (start, end, insertion index)."""
    out, end = [], 0.0
    for i, (s, e, _) in enumerate(ev + [(dur, dur, "")]):
        if s - end >= 1.0:
            out.append((end, s, i))
        end = max(end, e)
    return out


def candidates(ev, dur, vocab, llm):
    """{sub-factor: event indices (gaps for "add")} where it applies; "repeat" needs a previous text that
    describes something (>= 2 words), not a bare "<evi>, and"."""
    K = len(ev)
    c = {"shift": [k for k in range(K) if shift_ranges(ev, k, dur)], "add": gaps(ev, dur),
         "delete": list(range(K)) if K > 1 else [], "merge": list(range(K - 1)),
         "distort": [k for k in range(K) if llm or swappable(ev[k][2], vocab)],
         "repeat": [k for k in range(1, K) if ev[k][2] != ev[k - 1][2]
                    and sum(w != "<evi>" for w in TOKEN.findall(ev[k - 1][2])) >= 2]}
    return {sub: ks for sub, ks in c.items() if ks}


def apply(sub, ev, cands, dur, rng, vocab, llm):
    """-> (rejected events, perturbed indices in chosen, their indices in rejected)."""
    if sub == "add":  # a false event in free time, with a copy of the next (or last) event's chunk form
        a, b, i = rng.choice(cands)
        L = rng.uniform(0.5, 1.0) * min(b - a, max(2.0, sum(e - s for s, e, _ in ev) / len(ev)))
        s = min(max(round(rng.uniform(a, b - L), 2), a), b)
        return ev[:i] + [(s, min(round(s + L, 2), b), ev[min(i, len(ev) - 1)][2])] + ev[i:], [], [i]
    if sub == "delete":
        k = rng.choice(cands)
        return ev[:k] + ev[k + 1:], [k], []
    if sub == "merge":
        k = rng.choice(cands)
        return ev[:k] + [(ev[k][0], max(ev[k][1], ev[k + 1][1]), ev[k][2])] + ev[k + 2:], [k, k + 1], [k]
    done = []  # shift / distort / repeat: one or more events, indices unchanged
    for k in sorted(rng.sample(cands, rng.randint(1, max(1, len(cands) // 2)))):
        s, e, c = ev[k]
        if sub == "shift":
            ranges = shift_ranges(ev, k, dur)
            if not ranges:
                continue
            a, b = rng.choices(ranges, [b - a for a, b in ranges])[0]
            o = rng.uniform(a, b)
            s, e = (min(max(round(t, 2), 0.0), dur) for t in (s + o, e + o))  # clip into the video
        else:
            c = distort(c, rng, vocab, llm) if sub == "distort" else ev[k - 1][2]
        if (s, e, c) != ev[k]:
            ev, done = ev[:k] + [(s, e, c)] + ev[k + 1:], done + [k]
    return ev, done, done


def perturb(ev, dur, rng, vocab, llm=None):
    """One factor, one sub-factor, some events -> (factor, sub, rejected, events, rejected_events) or None."""
    cands = candidates(ev, dur, vocab, llm)
    while cands:
        factor = rng.choice(sorted({f for f, subs in FACTORS.items() if any(s in cands for s in subs)}))
        sub = rng.choice([s for s in FACTORS[factor] if s in cands])
        rej, ks, rks = apply(sub, ev, cands.pop(sub), dur, rng, vocab, llm)
        if valid(rej, dur) and all(e > s for s, e, _ in rej) and render(rej) != render(ev):
            return factor, sub, rej, ks, rks
    return None


def synth(records, seed=0, llm=None):
    """Annotation records (as read_annotations checks them) -> (preference pairs, Counter of factor/sub-factor and
    skipped counts)."""
    rng = random.Random(seed)
    vocab = build_vocab(records)
    pairs = []
    counts = Counter()
    for rec in records:
        ev = parse(rec)
        out = ev and perturb(ev, rec["duration"], rng, vocab, llm)
        if not out:
            why = "stages, time_gt or order do not line up" if ev is None else "nothing applicable"
            counts[f"skipped ({why})"] += 1
            continue
        factor, sub, rej, ks, rks = out
        counts[f"{factor}/{sub}"] += 1
        pairs.append({"video": rec["video"], "duration": rec["duration"], "task": rec.get("task"),
                      "question": turns(rec)["human"], "chosen": render(ev), "rejected": render(rej),
                      "factor": factor, "sub_factor": sub, "events": ks, "rejected_events": rks})
    return pairs, counts


def llm_distorter(hf_dir, max_new_tokens=64):
    """--llm: distort an event's text by asking a Phi-3 checkpoint (an HF folder with tokenizer.model) through our
    own greedy sampler, as the paper prompts an off-the-shelf LLM; distort() keeps the answer only if it has
    exactly one <evi>."""
    import torch
    from nanod2vlm.checkpoint import load_phi3
    from nanod2vlm.tokenizer import Tokenizer
    tok = Tokenizer.phi3(hf_dir)
    llm = load_phi3(hf_dir)

    def ask(chunk):
        ids = tok.encode(tok.chat(LLM_PROMPT.format(chunk=chunk)))
        x = llm.model.embed_tokens(torch.tensor([ids]))
        return tok.decode(llm.generate(x, max_new_tokens, tok.end_id)).replace("<|end|>", "")
    return ask


@cli
def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inp", nargs="?", default="data/world/train.json", help="annotation records (read_annotations)")
    p.add_argument("out", nargs="?", default="data/world/fpo_pairs.json", help="the preference pairs (JSON list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm", default=None, help="an HF Phi-3 folder that distorts texts (default: rule-based swaps)")
    args = p.parse_args(argv)
    writable(args.out, "OUT")
    pairs, counts = synth(read_annotations(args.inp), args.seed, llm_distorter(args.llm) if args.llm else None)
    write_atomic(args.out, json.dumps(pairs, indent=1))  # a kill leaves no half file that train.py would take
    for key, n in sorted(counts.items()):
        print(f"{key:40s} {n}")
    print(f"wrote {len(pairs)} pairs to {args.out}")


if __name__ == "__main__":
    main()
