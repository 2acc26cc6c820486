"""examples/walkthrough/ runs in the plain runtime install: no diffusers, transformers or other test extras.

All six scripts run in one subprocess (one torch import) in which importing diffusers, transformers,
OpenAI's clip, scikit-video or pytest raises ImportError, so a script that needs them fails here as it would
after `pip install -e .` alone. Each script's printout is checked for the thing it exists to show.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

WALKTHROUGH = Path(__file__).resolve().parents[1] / "examples" / "walkthrough"
SCRIPTS = sorted(p.name for p in WALKTHROUGH.glob("[0-9]_*.py"))
BLOCKED = ("diffusers", "transformers", "clip", "skvideo", "pytest")
RUNNER = f"""
import runpy, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not part of stemref's runtime install")
        return None

sys.meta_path.insert(0, NotInstalled())
sys.path.insert(0, {str(WALKTHROUGH)!r})
for script in {SCRIPTS!r}:
    print(f"WALKTHROUGH {{script}}", flush=True)
    runpy.run_path({str(WALKTHROUGH)!r} + "/" + script, run_name="__main__")
"""


def test_walkthrough_runs_without_the_test_extras():
    assert len(SCRIPTS) == 6
    run = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = dict(re.findall(r"^WALKTHROUGH (\S+)\n(.*?)(?=^WALKTHROUGH |\Z)", run.stdout, flags=re.S | re.M))
    assert sorted(out) == SCRIPTS

    # 1: after 10 iterations every cluster centre has a basis within 0.1
    final = re.search(r"^\s+10 \| (.*)$", out["1_em_clusters.py"], flags=re.M).group(1)
    assert all(float(d) < 0.1 for d in final.split())
    # 2: on clustered tokens, STEM with as many bases as clusters is within 1 % of all-frame attention
    assert float(re.search(r"K =  12: .* difference ([0-9.]+)", out["2_stem_vs_all_frame.py"]).group(1)) < 0.01
    # 3: every context reconstructs better with more steps
    errors = re.findall(r"^(\S+)\s+\|\s+(\d+) \|\s+([0-9.]+) \|", out["3_inversion_contexts.py"], flags=re.M)
    by_context = {}
    for context, steps, error in errors:
        by_context.setdefault(context, []).append(float(error))
    assert sorted(by_context) == ["1-frame", "2-frame", "all-frame", "stem"]
    assert all(e[1] < e[0] for e in by_context.values()), by_context
    # 4: a keyframe per batch, and matches printed for a frame that is not a keyframe
    assert re.search(r"keyframes this step: \[\d, \d, \d\]", out["4_tokenflow_step.py"])
    assert re.search(r"nearest token in keyframe \d .*\n(  (\d\d ){7}\d\d\n){8}", out["4_tokenflow_step.py"])
    # 5: the fused map is the reweighted source map inside the window and the fresh one outside
    assert out["5_fatezero_word_swap.py"].count(": True") == 2
    # the blend map is drawn on its own range, which the script states next to the 0.7 threshold
    assert re.search(r"its own range, [01]\.\d\d to 1 × its maximum", out["5_fatezero_word_swap.py"])
    # 6: both methods tuned and printed a finite loss per step
    for method in ("tune-a-video", "ei2"):
        losses = re.search(rf"{method}\s*: .* loss per step \[(.*)\]", out["6_tuning.py"]).group(1).split(", ")
        assert len(losses) > 1 and all(0 < float(x) < 100 for x in losses)
