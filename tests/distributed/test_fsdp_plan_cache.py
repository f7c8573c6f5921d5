"""``dcp.planned.save_planned`` reuses a writer's global plan between FSDP2 saves only while no rank's local plan changed
(dtype included), and recovers with one more round when the coordinator lacks the plan a rank names."""
from __future__ import annotations

import json
import os

from support import TESTS
from support.launch import torchrun

SCRIPT = os.path.join(TESTS, "distributed", "fsdp_plan_cache_script.py")


def test_the_global_plan_is_reused_only_while_every_local_plan_is_unchanged(tmp_path):
    torchrun(2, SCRIPT, str(tmp_path))
    rank0 = json.loads((tmp_path / "out-0.json").read_text())
    saves = {s["label"]: s for s in rank0["saves"]}
    for s in rank0["saves"]:
        assert s["loaded_equal"], s
    assert saves["first"]["global_plans"] == 1 and saves["same state"]["global_plans"] == 0
    assert saves["first"]["dtypes"] == saves["same state"]["dtypes"] == ["F32"]
    # a cast changes no shape, but the plan: planned again, and the manifest says the new dtype
    assert saves["cast"]["global_plans"] == 1 and saves["cast"]["dtypes"] == ["F64"]
    assert saves["cast again"]["global_plans"] == 0 and saves["cast again"]["dtypes"] == ["F64"]
    # the coordinator without the plans asks every rank for its plan again: one more gather, a fresh global plan
    lost = saves["coordinator without the plans"]
    assert lost["global_plans"] == 1 and lost["gathers"] == saves["cast again"]["gathers"] + 1, rank0["saves"]
    assert saves["after"]["global_plans"] == 0
    # beyond CACHE_MAX_ITEMS nothing is kept: every save plans afresh, with no extra round
    for label in ("too large to keep", "too large to keep, again"):
        assert saves[label]["global_plans"] == 1 and saves[label]["gathers"] == saves["after"]["gathers"], saves[label]
    assert rank0["kept_before_close"] == 1 and rank0["kept_after_close"] == 0  # close() drops the writer's planning
