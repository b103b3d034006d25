"""Two worker processes share one tune study on a real PostgreSQL server, started here in a temporary
folder with initdb + pg_ctl (CI installs Debian's postgresql package: .ci/run)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

WORKER = """
import sys
import graphopt
from tests.search.tune_models import agreement, mlp, quick
model, example = mlp()
graphopt.tune(model, example, evaluate=agreement, accuracy_budget=5.0, trials=int(sys.argv[2]), storage=sys.argv[1],
              study_name="shared", search_space={"prune_options.sensitivity": [False], "finetune.epochs": None},
              speed_check=quick(), progress=lambda line: print(line, flush=True) if line.startswith("trial") else None)
"""


def _binaries() -> tuple[str, str] | None:
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return found[0], found[1]
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):   # Debian keeps them off PATH
        if os.path.exists(f"{folder}/initdb") and os.path.exists(f"{folder}/pg_ctl"):
            return f"{folder}/initdb", f"{folder}/pg_ctl"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql "
                    "(CI installs them in .ci/run)")
    initdb, pg_ctl = binaries
    folder = Path(tempfile.mkdtemp(prefix="graphopt-pg-"))   # not under pytest's root-only tmp folder
    data = folder / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:   # the server refuses to run as root: run it as Debian's postgres user
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(initdb, "-D", str(data), "-U", "tune", "--auth=trust", "-E", "UTF8")
    run(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "30", "-o",
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder}", "start")
    try:
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgres(postgres_url):
    import optuna
    trials = 4
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, str(trials)], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [out[-2500:] for out in outputs]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = study.get_trials(deepcopy=False)
    # the study's total is shared: the workers stop at `trials` measured configs; one may have started its last
    # trial as the other finished the total (the stop is checked after each trial). Repeats, answered with an
    # earlier trial's result, do not count.
    measured = [t for t in done if "reused_from" not in t.user_attrs]
    assert trials <= len(measured) <= trials + 1
    pids = {str(w.pid) for w in workers}
    ran_by = [t.user_attrs["worker"].rsplit(":", 1)[1] for t in done]
    assert set(ran_by) == pids, ran_by                                  # trials from both workers
    ran = [{int(line.split()[1]) for line in out.splitlines() if line.startswith("trial")} for out in outputs]
    assert not ran[0] & ran[1], ran                                     # no trial run by both
    assert ran[0] | ran[1] == {t.number for t in done}                  # and every trial run by one of them
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in done)
    assert sum(t.state.name == "COMPLETE" for t in done) >= 2
