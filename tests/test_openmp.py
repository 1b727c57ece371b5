"""stream-ser asks OpenMP's workers to sleep between parallel regions, before torch loads, unless the
user chose a policy (why: stream_ser/openmp.py; figures: bench/under_load.py). Each case runs in a fresh
interpreter, since the policy only counts before the first torch import."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, policy: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = "import json, os{pre}\nfrom stream_ser.openmp import prefer_passive_wait\nok = prefer_passive_wait()\n" \
        "print(json.dumps({{'ok': ok, 'policy': os.environ.get('OMP_WAIT_POLICY')}}))"


def test_sets_passive_before_torch_loads():
    assert _run(PROBE.format(pre="")) == {"ok": True, "policy": "PASSIVE"}


def test_a_users_policy_wins():
    assert _run(PROBE.format(pre=""), policy="ACTIVE") == {"ok": False, "policy": "ACTIVE"}


def test_too_late_once_torch_has_loaded():
    """After torch loads, libgomp has read its policy: nothing is set and the answer says so."""
    assert _run(PROBE.format(pre="\nimport torch")) == {"ok": False, "policy": None}


def test_stream_ser_main_sets_it_first():
    code = ("import json, os, sys\nfrom stream_ser import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'torch': 'torch' in sys.modules}))")
    assert _run(code) == {"policy": "PASSIVE", "torch": False}
