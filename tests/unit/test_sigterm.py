"""SIGTERM unwinds the process that installed the handler and only that
one: a forked child (pyroute2 forks one per namespace operation and stops
it with SIGTERM) must not run its parent's clean-up."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from tests.support.sigterm import unwind_on_sigterm
    unwind_on_sigterm()
    marks = sys.argv[1]
    owner = os.getpid()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, b"x")
            time.sleep(30)      # SIGTERMed here, inside the parent's try
            os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        with open(marks, "a") as f:
            f.write("finally " + ("owner" if os.getpid() == owner else "child") + "\\n")
""")


def test_sigterm_unwinds_the_owner_and_not_a_forked_child(tmp_path):
    marks = tmp_path / "marks"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(marks)], capture_output=True,
                       text=True, timeout=20, cwd=ROOT)
    assert "child 143" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 143, p.stderr
    # only the owner's finally ran; a child's would add a second line
    assert marks.read_text().splitlines() == ["finally owner"]
