"""``executor.run`` fails fast and honestly: everything checked before torch is imported or a
process starts; a hung peer is the rank named; SIGTERM and Ctrl-C end the run with one line,
no temp directory and no orphan."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from executor.run import main
from tests.conftest import EXAMPLES, ROOT

PPO = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")
PLANS = EXAMPLES / "plans" / "ppo-tiny-2xcpu"
DP2, DISJOINT = str(PLANS / "dp2.json"), str(PLANS / "disjoint.json")


@pytest.fixture
def no_launch(monkeypatch):
    import executor.launch as launch_mod

    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("processes started for invalid input"))


def _fails(capsys, argv, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_defaults_agree_and_the_collective_timeout_is_minutes():
    import executor.launch as launch_mod
    import executor.run as run_mod
    from executor.runtime import DTYPES

    assert run_mod.DEFAULT_TIMEOUT_S == launch_mod.DEFAULT_TIMEOUT_S
    assert 60 <= run_mod.DEFAULT_TIMEOUT_S <= 600
    assert sorted(run_mod.DTYPE_NAMES) == sorted(DTYPES)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1e9"])
def test_bad_timeouts(capsys, no_launch, value):
    _fails(capsys, [PPO, "--plan", DP2, "--timeout-s", value], f"--timeout-s={float(value)!r}"
           if math.isfinite(float(value)) else "--timeout-s=")


@pytest.mark.parametrize("fault, needle", [
    ("2:actor_gen", "rank 2 is out of range; the cluster has ranks 0-1"),
    ("1:actor_gen", "rank 1 never runs actor_gen (its mesh is 0)"),
    ("1:nope", "unknown call 'nope'"),
    ("9" * 5000 + ":actor_gen", "must look like RANK:CALL"),  # int() of 5,000 digits raises
])
def test_faults_that_would_never_fire(capsys, no_launch, fault, needle):
    _fails(capsys, [PPO, "--plan", DISJOINT, "--inject-fault", fault], needle)


def _write_exp(tmp_path, text_or_change) -> str:
    text = (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text()
    if isinstance(text_or_change, dict):
        data = yaml.safe_load(text)
        for k, v in text_or_change.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
        text = yaml.safe_dump(data)
    else:
        text += text_or_change
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_non_finite_hyperparams_and_bad_profiles_are_refused(tmp_path, capsys, no_launch):
    _fails(capsys, [_write_exp(tmp_path, "hyperparams: {lr: .inf}\n"), "--plan", DP2], "hyperparams.lr=inf")
    _fails(capsys, [_write_exp(tmp_path, "hyperparams: {temperature: .nan}\n"), "--plan", DP2], "temperature=nan")
    (tmp_path / "dev.json").write_text("{garbage")
    _fails(capsys, [_write_exp(tmp_path, {"cluster": {"device": "dev.json"}}), "--plan", DP2],
           "cluster.device", "dev.json", "not valid JSON")


def test_garbage_safetensors_beside_a_config(tmp_path, capsys, no_launch):
    from estimator.spec.models import PRESETS
    from executor.hf import hf_config

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config(PRESETS["tiny-2l-128h"])))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    exp = _write_exp(tmp_path, {"models": {"actor": "ckpt/config.json"}})
    _fails(capsys, [exp, "--plan", DP2], "models.actor", "model.safetensors", "not valid JSON")


def test_bad_prompts_file(tmp_path, capsys, no_launch):
    (tmp_path / "p.jsonl").write_bytes(b"[1, 2, 3]\n\xff\n")
    _fails(capsys, [_write_exp(tmp_path, "prompts: p.jsonl\n"), "--plan", DP2], "p.jsonl", "not UTF-8")
    (tmp_path / "p.jsonl").write_text("[1, 2, NaN]\n")
    _fails(capsys, [_write_exp(tmp_path, "prompts: p.jsonl\n"), "--plan", DP2], "p.jsonl' line 1", "NaN")


def test_output_paths_are_checked_before_the_run(tmp_path, capsys, no_launch):
    _fails(capsys, [PPO, "--plan", DP2, "--trace", str(tmp_path)], "--trace", "is a directory")
    _fails(capsys, [PPO, "--plan", DP2, "--timeline", str(tmp_path / "no" / "t.json")], "--timeline",
           "does not exist")
    os.mkfifo(tmp_path / "fifo")
    _fails(capsys, [PPO, "--plan", DP2, "--timeline", str(tmp_path / "fifo")], "FIFO")
    _fails(capsys, [PPO, "--plan", ""], "plan file: the path is empty")


def test_invalid_input_is_refused_before_torch_is_imported(tmp_path):
    bad = json.loads((PLANS / "tp2.json").read_text())
    bad["calls"]["actor_gen"]["dp"] = 2
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code = ("import sys; from executor.run import main; "
            f"codes = [main([{PPO!r}, '--plan', {str(tmp_path / 'bad.json')!r}]), "
            f"main([{PPO!r}, '--plan', {DP2!r}, '--timeout-s', '0']), "
            f"main([{PPO!r}, '--plan', {DP2!r}, '--trace', {str(tmp_path)!r}])]; "
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[2, 2, 2] False", out.stderr


# ---- a hung peer -----------------------------------------------------------------------------


def hang_rank_1(rank: int, world: int, status) -> int:
    """Rank 1 stops itself (as SIGSTOP would) in the middle of a call; rank 0 waits for it."""
    import torch
    import torch.distributed as dist

    status("call actor_gen (iteration 0)")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.ones(1))
    return rank


def test_a_hung_peer_is_the_rank_reported():
    from executor.launch import WorkerFailed, launch

    start = time.monotonic()
    with pytest.raises(WorkerFailed) as err:
        launch(2, hang_rank_1, timeout_s=3.0)
    assert err.value.rank == 1, str(err.value)
    assert err.value.where == "call actor_gen (iteration 0)"
    assert "stopped responding" in err.value.reason and "SIGSTOP" in err.value.reason
    assert time.monotonic() - start < 60


# ---- SIGTERM and Ctrl-C ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, code, how", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_ends_the_run_with_one_line_and_no_leftovers(tmp_path, sig, code, how):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "executor.run", PPO, "--plan", DP2, "--iterations", "1000"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert "starting 2 gloo worker processes" in proc.stderr.readline()
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # workers mid start-up
        workers = _children(proc.pid)
        assert workers
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole process group
        else:
            proc.send_signal(sig)
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == code, err
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert lines == [f"error: interrupted by {how}; every worker was stopped"], err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(w) for w in workers)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("rlhf-plan-run-")]


# ---- start-up ------------------------------------------------------------------------------


def test_cpu_adam_imports_no_dynamo_and_is_bitwise_torch_adam():
    code = ("import sys, torch; from executor.optim import ShardAdam; p = {'w': torch.ones(3, requires_grad=True)}; "
            "o = ShardAdam(p, 0.1); p['w'].grad = torch.ones(3); o.step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False", out.stderr

    import torch

    from executor.optim import ShardAdam

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g), torch.randn(7, generator=g)
    mine = {"a": a.clone().requires_grad_(), "b": b.clone().requires_grad_()}
    ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    opt, torch_opt = ShardAdam(mine, lr=3e-3), torch.optim.Adam(ref, lr=3e-3)
    for k in range(5):
        grads = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g) if k % 2 else None]  # b skips steps
        for t, r, gr in zip(mine.values(), ref, grads):
            t.grad, r.grad = (None, None) if gr is None else (gr.clone(), gr.clone())
        opt.step()
        torch_opt.step()
    assert torch.equal(mine["a"], ref[0]) and torch.equal(mine["b"], ref[1])
