"""Tests of the Ray fan-out (manymodels.engine): the pure chunk packer, Engine.map on local Ray, and
Engine.started (Ray's start beside the driver's planning, and its stop)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from manymodels.data import key_label
from manymodels.engine import Engine, TaskResources, pack_chunks


def _flat(chunks: list[list[int]]) -> list[int]:
    return [i for c in chunks for i in c]


@pytest.mark.parametrize("sizes", [[], [5], [100] * 37, [1, 2_000_000, 3, 4], list(range(1, 500))])
def test_every_index_once_in_order(sizes: list[int]) -> None:
    chunks = pack_chunks(sizes, slots=4)
    assert _flat(chunks) == list(range(len(sizes)))
    assert all(chunks)


def test_chunks_near_target_size() -> None:
    sizes = [1_000] * 1_000  # 1M rows, 2 slots × 12 waves → target ≈ 41,666 rows
    chunks = pack_chunks(sizes, slots=2)
    rows = [sum(sizes[i] for i in c) for c in chunks]
    target = 1_000_000 // 24
    assert all(r <= target for r in rows)
    assert all(r > target - 1_000 for r in rows[:-1])  # only the last chunk may be short
    assert 20 <= len(chunks) <= 30


def test_huge_item_gets_its_own_chunk() -> None:
    sizes = [10] * 50 + [5_000_000] + [10] * 50
    chunks = pack_chunks(sizes, slots=2)
    assert [50] in chunks
    assert _flat(chunks) == list(range(len(sizes)))
    before, after = chunks.index([50]), chunks.index([50]) + 1
    assert all(i < 50 for c in chunks[:before] for i in c)
    assert all(i > 50 for c in chunks[after:] for i in c)


def test_many_tiny_items_share_chunks() -> None:
    sizes = [100] * 10_000
    chunks = pack_chunks(sizes, slots=2)
    assert 10 <= len(chunks) <= 200
    assert _flat(chunks) == list(range(10_000))
    # Small totals still fill chunks up to min_rows rather than one task per item.
    small = pack_chunks([100] * 100, slots=16)
    assert len(small) == 5 and all(len(c) == 20 for c in small)


def test_max_items_and_bounds() -> None:
    chunks = pack_chunks([1] * 1_000, slots=1, max_items=7)
    assert all(len(c) <= 7 for c in chunks)
    assert _flat(chunks) == list(range(1_000))
    capped = pack_chunks([1_000] * 100, slots=1, max_rows=5_000, min_rows=10)
    assert all(len(c) == 5 for c in capped)


def test_task_resources_options() -> None:
    assert TaskResources().options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    opts = TaskResources(num_cpus=2, num_gpus=0.5, memory_mb=300).options()
    assert opts == {"num_cpus": 2, "num_gpus": 0.5, "memory": 300 * 1024 * 1024}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_map_streams_results_and_errors() -> None:
    import ray

    # key_label(names, key) is a plain module-level function workers can import; a length mismatch
    # raises ValueError (zip strict), which must come back as the task's result, not stop the map.
    payloads = [["a", "b"], ["a"], ["x", "y"], ["p", "q"]]
    with Engine() as engine:
        assert not engine.embedded  # the session's Ray is reused, not replaced
        assert engine.resources()["CPU"] == 2
        assert engine.nodes() == 1
        results: dict[int, object] = {}
        for item in engine.map(key_label, payloads, resources=[TaskResources()] * len(payloads),
                               shared=(1, 2), wait_s=0.05):
            if item is None:
                continue
            i, result, node, wall = item
            assert i not in results
            results[i] = result
            if not isinstance(result, BaseException):
                assert node and wall >= 0
    assert ray.is_initialized()  # leaving the engine did not shut the session's Ray down
    assert sorted(results) == [0, 1, 2, 3]
    assert results[0] == "a=1,b=2" and results[2] == "x=1,y=2" and results[3] == "p=1,q=2"
    assert isinstance(results[1], ray.exceptions.RayError)
    assert isinstance(results[1], ValueError)


# Engine.started checks Ray's own start and stop, so it runs in a fresh interpreter (the session's
# Ray, once up, would be reused instead). Children still alive after the block would be Ray processes.
STARTED_SCRIPT = """
import json, sys, threading, time
import psutil, ray
from manymodels.engine import Engine, EngineError

out = {}
def plan():
    out["plan_in_other_thread"] = threading.current_thread() is not threading.main_thread()
    time.sleep(0.3)
    out["planned"] = out.get("planned", 0) + 1
    return 42
def bad_plan():
    time.sleep(0.1)
    raise ValueError("no partition matches --only")

# Ray cannot be joined: the plan still ends before the error comes out (no scan outlives the
# call), and a plan error wins over Ray's (it is about the user's input).
for beside in (plan, bad_plan):
    try:
        with Engine("127.0.0.1:1").started(beside=beside):
            out["entered_unreachable"] = True
    except (EngineError, ValueError) as exc:
        out.setdefault("unreachable", []).append([type(exc).__name__, out.get("planned", 0)])
def alive_children():
    return [p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

with Engine(num_cpus=1).started(beside=plan) as got:
    out["got"] = got
    out["up"] = ray.is_initialized() and bool(alive_children())
out["down"] = not ray.is_initialized() and not alive_children()
try:
    with Engine(num_cpus=1).started(beside=bad_plan):
        out["entered"] = True
except ValueError as exc:
    out["error"] = str(exc)
out["down_after_error"] = not ray.is_initialized() and not alive_children()
out["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.ray
def test_started_plans_beside_ray_start_and_stops_ray_after_success_and_plan_error(
        clean_env: dict[str, str]) -> None:
    """The plan runs in another thread while Ray starts; its result comes out with Ray up; Ray and
    every process it started are gone after the block, and after a plan error (which is raised as is,
    with nothing yielded), and no planning thread is left behind. When Ray cannot be joined, the plan
    is waited for, and its own error wins."""
    proc = subprocess.run([sys.executable, "-c", STARTED_SCRIPT], env=clean_env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    assert out == {"unreachable": [["EngineError", 1], ["ValueError", 1]], "plan_in_other_thread": True,
                   "planned": 2, "got": 42, "up": True, "down": True, "error": "no partition matches --only",
                   "down_after_error": True, "threads": []}

