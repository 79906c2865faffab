"""Numba's threading layer as a host process leaves it: fastopt detects the layer in use
and keeps its promises (concurrent steps, steps in forked children) or says clearly why
it cannot.

Each case runs in a fresh interpreter, since Numba picks its layer once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, warnings
    import numba, numpy as np
    setup = sys.argv[1]
    if setup == "host-pool":          # the host used Numba's pool before importing fastopt
        numba.get_num_threads()
    elif setup == "host-code":        # the host chose a layer in code, before fastopt
        numba.config.THREADING_LAYER = "workqueue"
    import fastopt as fo
    if setup == "host-code-late":     # ... or after importing fastopt, before any step
        numba.config.THREADING_LAYER = "workqueue"
    elif setup == "host-pool-after-import":  # the host's pool starts after import fastopt
        numba.get_num_threads()
    n = 3 * 65536 + 5
    opts = [fo.Adam([np.zeros(n, np.float32)], lr=0.1) for _ in range(3)]
    g = [np.ones(n, np.float32)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts[0].step(g)
    out = {"layer": numba.threading_layer(),
           "warnings": [w.category.__name__ for w in caught],
           "messages": [str(w.message) for w in caught]}
    def work(o):
        for _ in range(30):
            o.step(g)
    ts = [threading.Thread(target=work, args=(o,)) for o in opts]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out["after_threads"] = [float(o.param_groups[0]["params"][0][0]) for o in opts]
    before = opts[0].param_groups[0]["params"][0].copy()
    pid = os.fork()
    if pid == 0:
        try:
            opts[0].step(g)
            os._exit(0)
        except fo.ThreadingLayerError as e:
            same = np.array_equal(before, opts[0].param_groups[0]["params"][0])
            os._exit(3 if same else 4)
    _, status = os.waitpid(pid, 0)
    out["child"] = os.waitstatus_to_exitcode(status)
    out["info"] = fo.kernels.threads.describe()
    print(json.dumps(out))
""")


def run_setup(setup, env_layer=None):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if env_layer:
        env["NUMBA_THREADING_LAYER"] = env_layer
    proc = subprocess.run([sys.executable, "-c", SCRIPT, setup], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setup", ["none", "host-pool-after-import"])
def test_fastopt_pins_tbb_when_nobody_chose(setup):
    out = run_setup(setup)
    assert out["layer"] == "tbb"
    assert out["warnings"] == []
    assert out["child"] == 0, "a step in a forked child must run on TBB"
    assert "chosen by fastopt" in out["info"]


def test_host_pool_started_first_gets_omp_a_warning_and_a_clear_error_in_forked_children():
    out = run_setup("host-pool")
    if out["layer"] != "omp":
        pytest.skip(f"Numba chose {out['layer']} for the host here, not GNU OpenMP")
    assert out["warnings"] == ["ThreadingLayerWarning"]
    assert "fork" in out["messages"][0] and "NUMBA_THREADING_LAYER" in out["messages"][0]
    # Concurrent steps are fine on OpenMP, and every thread's 31 steps happened.
    assert len(set(out["after_threads"][1:])) == 1
    # The child did not abort: it got ThreadingLayerError and changed nothing.
    assert out["child"] == 3
    assert "started before fastopt was imported" in out["info"]


@pytest.mark.parametrize("setup", ["host-code", "host-code-late"])
def test_host_choice_of_workqueue_is_kept_and_concurrent_steps_are_serialised(setup):
    out = run_setup(setup)
    assert out["layer"] == "workqueue", "fastopt overrode the host's choice"
    assert out["warnings"] == ["ThreadingLayerWarning"]
    assert "serialises" in out["messages"][0]
    # Three threads stepping three optimizers at once did not abort the process, and
    # the steps all happened (the two untouched-before optimizers agree).
    assert out["after_threads"][1] == out["after_threads"][2] != 0.0
    assert out["child"] == 0, "workqueue is fork-safe: the child steps"
    assert "serialised" in out["info"]


def test_environment_choice_is_kept():
    out = run_setup("none", env_layer="workqueue")
    assert out["layer"] == "workqueue"
    assert "chosen by the environment" in out["info"]
