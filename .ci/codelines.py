"""Code lines by role, as the README's budget counts them: `python .ci/codelines.py`.

A code line is a physical line holding code: blank lines, comment-only lines and docstring lines do not count.
Roles: the system (what a reader must read to train and run D²VLM), evaluation (scorers and benchmark runners),
the synthetic world and the speed benchmark.
"""
import glob
import io
import os
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = {"evaluation": ("nanod2vlm/eval.py",), "world + speed benchmark": ("nanod2vlm/world.py", "nanod2vlm/bench.py")}
BUDGET = {"system": 1500, "evaluation": 450, "world + speed benchmark": 400}


def code_lines(path):
    lines = set()
    with open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(io.StringIO(f.read()).readline):
            if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
                continue
            if tok.type == tokenize.STRING and tok.line.strip().startswith(('"""', "'''", 'r"""')):
                continue  # a docstring
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


files = sorted(glob.glob("nanod2vlm/*.py", root_dir=ROOT)) + ["train.py", "sample.py", "synth.py"]
counts = {f: code_lines(os.path.join(ROOT, f)) for f in files}
role_of = {f: role for role, fs in ROLES.items() for f in fs}  # every other file is the system's
for role, budget in BUDGET.items():
    mine = [f for f in files if role_of.get(f, "system") == role]
    total = sum(counts[f] for f in mine)
    print(f"{role}: {total} code lines (budget {budget}{', over by ' + str(total - budget) if total > budget else ''}): "
          + ", ".join(f"{f} {counts[f]}" for f in mine if counts[f]))
