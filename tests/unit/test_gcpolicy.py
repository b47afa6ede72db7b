"""The daemon's GC settings (daemon/gcpolicy.py): in a child interpreter, so this
test process keeps its own."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from exgen.daemon import gcpolicy
before = gc.get_threshold()
gcpolicy.tune()
after = gc.get_threshold()
print(after[0], after[1:] == before[1:], gc.get_freeze_count() > 0)
"""


def test_tune_raises_the_first_generation_and_freezes_startup_objects():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    first, rest_kept, frozen = out.stdout.split()
    assert int(first) == 10_000
    assert rest_kept == "True" and frozen == "True"


def test_the_client_library_leaves_its_callers_gc_alone():
    code = "import gc; t = gc.get_threshold(); import exgen.client; print(gc.get_threshold() == t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
