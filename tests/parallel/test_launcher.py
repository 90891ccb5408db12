"""scripts/msrun_launcher.sh: MindFormers' 1/2/6/9-argument layouts, defaults, and refusals."""
import os
import subprocess

from tests.paths import ROOT


def launch(*args):
    env = dict(os.environ, MSRUN="echo msrun")
    r = subprocess.run(["bash", "scripts/msrun_launcher.sh", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def msrun_line(out):
    return [l for l in out.splitlines() if l.startswith("msrun ")][-1]


def test_one_argument_defaults_to_8_workers():
    rc, out, _ = launch("run_mindformer.py --config a.yaml")
    assert rc == 0
    line = msrun_line(out)
    for part in ("--worker_num=8", "--local_worker_num=8", "--master_addr=127.0.0.1", "--master_port=8118",
                 "--log_dir=output/msrun_log", "--join=False", "--cluster_time_out=7200", "run_mindformer.py --config a.yaml"):
        assert part in line, part


def test_two_six_and_nine_argument_layouts():
    assert "--worker_num=4 --local_worker_num=4" in msrun_line(launch("x.py", "4")[1])
    line = msrun_line(launch("x.py", "4", "9000", "logs", "True", "60")[1])
    assert all(p in line for p in ("--worker_num=4", "--master_port=9000", "--log_dir=logs", "--join=True",
                                   "--cluster_time_out=60"))
    line = msrun_line(launch("x.py", "16", "8", "10.0.0.1", "9001", "1", "logs", "False", "300")[1])
    assert all(p in line for p in ("--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1",
                                   "--master_port=9001", "--node_rank=1"))


def test_refusals():
    rc, out, err = launch("run_mindformer.py --config a.yaml", "1")
    assert rc == 1 and "python run_mindformer.py --config a.yaml --use_parallel False" in err
    rc, _, err = launch("x.py", "2", "3")
    assert rc == 1 and "expected 1, 2, 6 or 9 arguments, got 3" in err
    rc, _, err = launch("x.py", "eight")
    assert rc == 1 and "WORKER_NUM=eight is not a number" in err
