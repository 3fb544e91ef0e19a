"""Faults through `torchrun run.py` on the CPU (gloo): a worker killed mid-run, a diverging run.

- Rank kill: FSDP=2 under `torchrun --max-restarts 1`, a checkpoint every 2 steps; one worker is
  SIGKILLed once `checkpoint/step-4` is complete. torchrun SIGTERMs the other worker and starts
  the group again (attempt 1) with the same arguments; it does nothing to the dump folder: the
  restarted trainer finds its own checkpoints there and loads the newest `step-N` that has a
  `.metadata` file (torchtitan skips a folder whose save was cut short). The losses after the
  restart equal those of a fresh run resumed from a copy of the same checkpoint, bit for bit.
  The launch uses the c10d rendezvous (`--standalone`) with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1:
  on torch 2.13 the restarted group otherwise usually fails in init_process_group ("Gloo
  connectFullMesh failed ... Connection refused": 4 of 4 tries with c10d without the variable,
  5 of 7 with the default static rendezvous (`--master_port`), which has no such switch): the
  workers of every attempt share the agent's TCPStore, keys not namespaced by attempt, and read
  the previous attempt's addresses (pytorch/pytorch#135712).
- Non-finite stop: with `--optimizer.lr 1e30 --lr_scheduler.warmup_steps 0` step 1 is finite and
  its update leaves huge but finite weights; at step 2 the gradients are no longer finite. The
  check runs before the optimizer step (loss and a fused gradient norm, one all-reduce), so both
  ranks stop together at that step, no update is applied and no checkpoint of it is written; the
  last checkpoint holds only finite values, loads, and replays the same stop when resumed (the
  step-N outcome is a function of the step-(N-1) state alone, and torchtitan restores the
  optimizer's lr and the scheduler from the checkpoint, so `--optimizer.lr` is ignored on resume).

Helpers for background torchrun launches (`Job`, `free_port`) and the clean-up of stray processes
are shared with tests/test_reshard_multinode.py.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_e2e import CONFIG, ROOT, _env, losses, torchrun

psutil = pytest.importorskip("psutil", reason="pip install psutil (listed in the dev extra)")

pytestmark = pytest.mark.slow

TINY = ["--job.config_file", CONFIG, "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--metrics.log_freq", "1"]
FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]
STOP_RE = re.compile(r"not finite at step (\d+)")


# ------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process this test started and everything below it (by pid)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def reap(marker: str) -> list[int]:
    """Kill leftovers whose command line names `marker` (this session's temporary folder), e.g.
    workers orphaned when `subprocess.run` timed out and killed only their torchrun agent."""
    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        if marker in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
    return killed


@pytest.fixture(scope="module", autouse=True)
def _reap_strays(tmp_path_factory):
    yield
    reap(str(tmp_path_factory.getbasetemp()) + os.sep)


class Job:
    """One torchrun launch in the background; stdout and stderr go to `log`."""

    def __init__(self, launcher: list[str], args: list[str], log: Path, **env: str):
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "run.py", *args]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **env}, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the agent and its workers (by pid), keeping the agent's exit status."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        self.proc.kill()
        self.proc.wait(timeout=30)
        for k in kids:
            kill_tree(k.pid)

    def workers(self) -> list:
        """The trainer processes the torchrun agent started (its children running run.py)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            try:
                if "run.py" in " ".join(k.cmdline()):
                    out.append(k)
            except psutil.NoSuchProcess:
                pass
        return out


def two_node_jobs(nproc_per_node: int, args_of_node, log_of_node) -> list[Job]:
    """Two torchrun agents (`--nnodes 2`, c10d rendezvous on a free localhost port), launched as
    two hosts would be; `args_of_node(n)` and `log_of_node(n)` give node n's run.py arguments
    and log file."""
    import uuid

    port, run_id = free_port(), f"optical-{uuid.uuid4().hex[:12]}"
    return [
        Job(["--nnodes=2", f"--nproc_per_node={nproc_per_node}", f"--node_rank={n}",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
             # Both agents resolve the endpoint as their own host and race to serve the store
             # (the loser's fallback to a client can fail under load): name the host, as on
             # real machines only the endpoint's host matches it.
             f"--rdzv_conf=join_timeout=120,is_host={'true' if n == 0 else 'false'}",
             "--local_addr=127.0.0.1"],
            args_of_node(n), log_of_node(n))
        for n in (0, 1)
    ]


def wait_all(jobs: list[Job], timeout: float, grace: float = 60.0) -> list[int]:
    """Wait for every job; once one fails, give the others `grace` seconds, then kill them."""
    deadline = time.monotonic() + timeout
    while True:
        rcs = [j.poll() for j in jobs]
        if all(rc is not None for rc in rcs):
            return rcs
        if any(rc not in (None, 0) for rc in rcs):
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for j in jobs:
                if j.poll() is None:
                    j.kill()
            tails = "\n".join(f"--- {j.log.name}\n{j.output()[-3000:]}" for j in jobs)
            raise AssertionError(f"torchrun jobs did not finish in time:\n{tails}")
        time.sleep(0.2)


def wait_for(cond, job: Job, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if job.poll() is not None:
            raise AssertionError(f"torchrun exited ({job.poll()}) before {what}:\n"
                                 f"{job.output()[-4000:]}")
        if time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"no {what} after {timeout}s:\n{job.output()[-4000:]}")
        time.sleep(0.05)


def checkpoint_steps(dump: Path, complete_only: bool = True) -> list[int]:
    folder = dump / "checkpoint"
    if not folder.is_dir():
        return []
    steps = []
    for d in folder.iterdir():
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (not complete_only or (d / ".metadata").is_file()):
            steps.append(int(m.group(1)))
    return sorted(steps)


def copy_checkpoint(src_dump: Path, step: int, dst_dump: Path) -> None:
    (dst_dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(src_dump / "checkpoint" / f"step-{step}",
                    dst_dump / "checkpoint" / f"step-{step}")


def read_checkpoint(step_dir: Path) -> dict:
    """Everything in a DCP checkpoint, loaded on the CPU without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(step_dir)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def ok(r: subprocess.CompletedProcess) -> str:
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return log


# ------------------------------------------------------------------------ rank kill and restart


def _attempt_logs(log_dir: Path) -> dict[int, str]:
    """torchrun --log-dir: <log_dir>/<run id>/attempt_<n>/<local rank>/{stdout,stderr}.log."""
    out: dict[int, str] = {}
    for d in sorted(log_dir.glob("*/attempt_*")):
        n = int(d.name.split("_")[1])
        out[n] = out.get(n, "") + "".join(
            f.read_text(errors="replace") for f in sorted(d.glob("0/std*.log")))
    return out


def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path):
    args = [*TINY, *FSDP2, "--training.steps", "8", "--debug.seed", "11", "--checkpoint.enable",
            "--checkpoint.interval", "2", "--checkpoint.no-last-save-model-only"]
    dump, log_dir = tmp_path / "run", tmp_path / "logs"
    job = Job(["--standalone", "--nproc_per_node=2", "--max-restarts=1", "--log-dir",
               str(log_dir), "--redirects", "3", "--tee", "3"],
              [*args, "--job.dump_folder", str(dump)], tmp_path / "torchrun.log",
              # A store of their own for the workers of each attempt (see the module docstring).
              TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        wait_for(lambda: 4 in checkpoint_steps(dump), job, 300, "complete checkpoint step-4")
        workers = job.workers()
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = max(workers, key=lambda w: int(w.environ().get("LOCAL_RANK", "-1")))
        os.kill(victim.pid, signal.SIGKILL)
        at_kill = sorted(p.name for p in (dump / "checkpoint").iterdir())
        complete_at_kill = checkpoint_steps(dump)
        rc = wait_all([job], timeout=400)[0]
    finally:
        if job.poll() is None:
            job.kill()
    full = job.output()
    assert rc == 0, full[-4000:]
    # The agent reports the first failure it sees: usually the killed rank (-9), sometimes its
    # peer, whose next collective failed first. Either way the group restarts (attempt 1).
    failure = re.search(r"failed \(exitcode: (-?\d+)\) local_rank: ([01]) \(pid: (\d+)\)", full)
    assert failure, full[-4000:]
    assert failure.group(1) == "-9" or int(failure.group(3)) != victim.pid, failure.group(0)
    attempts = _attempt_logs(log_dir)
    assert sorted(attempts) == [0, 1], (sorted(attempts), full[-3000:])
    first, second = losses(attempts[0]), losses(attempts[1])
    assert "Loading the checkpoint" not in attempts[0]
    m = re.search(r"Loading the checkpoint from (\S+)/step-(\d+)\.", attempts[1])
    assert m, attempts[1][-3000:]
    k = int(m.group(2))
    print(f"checkpoint folder at the kill: {at_kill}; restart loaded step-{k}; "
          f"attempt 0 logged steps {sorted(first)}; "
          f"after: {sorted(p.name for p in (dump / 'checkpoint').iterdir())}")
    assert k in (4, 6) and k >= max(complete_at_kill), (k, complete_at_kill)
    assert sorted(second) == list(range(k + 1, 9)), second
    assert set(range(1, 5)) <= set(first), first
    # Steps attempt 0 logged past the checkpoint come out of attempt 1 the same.
    for s in set(first) & set(second):
        assert first[s] == second[s], (s, first, second)

    # The uninterrupted continuation of the same checkpoint: a fresh folder holding only step-k.
    copy_checkpoint(dump, k, tmp_path / "ref")
    ref = losses(ok(torchrun(2, *args, "--job.dump_folder", str(tmp_path / "ref"), timeout=300)))
    assert sorted(ref) == list(range(k + 1, 9)), ref
    assert second == ref, (second, ref)


# ------------------------------------------------------------------------------ non-finite stop

BAD_LR = ["--optimizer.lr", "1e30", "--lr_scheduler.warmup_steps", "0"]
NF_ARGS = [*TINY, *FSDP2, "--training.steps", "6", "--debug.seed", "5", "--checkpoint.enable",
           "--checkpoint.interval", "1", "--checkpoint.no-last-save-model-only"]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    r = torchrun(2, *NF_ARGS, *BAD_LR, "--job.dump_folder", str(tmp / "bad"), timeout=300)
    log = r.stdout + r.stderr
    m = STOP_RE.search(log)
    assert m, log[-4000:]
    return tmp, r, log, int(m.group(1))


def test_nonfinite_loss_stops_before_that_steps_checkpoint(diverged):
    tmp, r, log, n = diverged
    assert r.returncode != 0, log[-3000:]
    assert n >= 2, log[-3000:]  # there is a checkpoint before the stop
    print(f"lr 1e30: losses {losses(log)}, stopped at step {n}, exit code {r.returncode}")
    # Every rank stops at the same step (none is left waiting in a collective).
    for rank in (0, 1):
        assert f"[rank{rank}]: torchtitan_ext.titan.launch.NonFiniteLossError" in log, log[-3000:]
    assert set(STOP_RE.findall(log)) == {str(n)}
    # The check runs before the optimizer step, so step n logs no loss and applies no update.
    seen = losses(log)
    assert sorted(seen) == list(range(1, n)), seen
    assert all(math.isfinite(seen[s]) for s in range(1, n))
    folder = tmp / "bad" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{s}" for s in range(1, n)]
    assert checkpoint_steps(tmp / "bad") == list(range(1, n))


def test_last_checkpoint_loads_and_replays_the_stop(diverged):
    tmp, _, _, n = diverged
    last = tmp / "bad" / "checkpoint" / f"step-{n - 1}"
    state = dict(_flat(read_checkpoint(last)))
    assert int(state["train_state.step"]) == n - 1
    for part in ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.rng_state"):
        assert any(k.startswith(part) for k in state), part
    assert sum(k.endswith(".optical_ranges") for k in state) == 32
    # Resumed in a fresh folder with a sane lr: the step-n loss depends on the step-(n-1) state
    # alone (weights, ranges, data position, noise generators; the lr is restored from the
    # checkpoint too), so the resumed run stops at the same step, again before its checkpoint.
    copy_checkpoint(tmp / "bad", n - 1, tmp / "resumed")
    r = torchrun(2, *NF_ARGS, "--optimizer.lr", "2e-3", "--job.dump_folder",
                 str(tmp / "resumed"), timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-3000:]
    assert f"Loading the checkpoint from {tmp / 'resumed' / 'checkpoint' / f'step-{n - 1}'}" in log
    assert set(STOP_RE.findall(log)) == {str(n)}, log[-3000:]
    assert sorted(losses(log)) == []
    assert checkpoint_steps(tmp / "resumed", complete_only=False) == [n - 1]


def test_last_checkpoint_before_the_stop_is_finite(diverged):
    """The check covers the gradients too and runs before the optimizer step, so no non-finite
    update is ever applied or checkpointed."""
    tmp, _, _, n = diverged
    state = dict(_flat(read_checkpoint(tmp / "bad" / "checkpoint" / f"step-{n - 1}")))
    bad = sorted(k for k, v in state.items()
                 if hasattr(v, "is_floating_point") and v.is_floating_point()
                 and not v.isfinite().all())
    assert not bad, f"{len(bad)} non-finite tensors, e.g. {bad[:4]}"


# ------------------------------------------------ kill during a save, then a damaged step folder

CKPT_ARGS = [*TINY, "--training.steps", "8", "--debug.seed", "13", "--checkpoint.enable",
             "--checkpoint.interval", "2", "--checkpoint.no-last-save-model-only"]


def _wait_dead(proc, timeout: float = 30.0) -> None:
    """Until a SIGKILLed process is gone or a zombie (its stopped parent cannot reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {proc.pid} still running after SIGKILL")


def test_kill_during_save_then_truncated_step_resumes_from_newest_loadable(tmp_path):
    """kill -9 while step-6 is being saved, step-4's data file truncated by hand, then torchrun
    (--max-restarts 1) restarts the worker: it skips step-6 (no .metadata) and step-4 (truncated)
    with one warning, loads step-2, and logs the losses of the uninterrupted run.

    The agent is SIGSTOPped around the kill and the truncation, so its restart starts only once
    the folder is damaged (the damage happens 'between' the crash and the restart)."""
    ref = losses(ok(torchrun(1, *CKPT_ARGS, "--job.dump_folder", str(tmp_path / "ref"),
                             timeout=300)))
    assert sorted(ref) == list(range(1, 9)), ref
    dump, log_dir = tmp_path / "run", tmp_path / "logs"
    job = Job(["--standalone", "--nproc_per_node=1", "--max-restarts=1", "--log-dir",
               str(log_dir), "--redirects", "3", "--tee", "3"],
              [*CKPT_ARGS, "--job.dump_folder", str(dump)], tmp_path / "torchrun.log",
              TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    step6 = dump / "checkpoint" / "step-6"
    try:
        # The step folder appears when rank 0 records the transform, just before DCP writes.
        wait_for(step6.is_dir, job, 300, "the save of step-6 starting")
        os.kill(job.proc.pid, signal.SIGSTOP)
        try:
            (victim,) = job.workers()
            os.kill(victim.pid, signal.SIGKILL)
            _wait_dead(victim)
            metadata_at_kill = (step6 / ".metadata").is_file()
            data = dump / "checkpoint" / "step-4" / "__0_0.distcp"
            with open(data, "r+b") as f:
                f.truncate(data.stat().st_size // 2)
        finally:
            os.kill(job.proc.pid, signal.SIGCONT)
        rc = wait_all([job], timeout=400)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert rc == 0, job.output()[-4000:]
    attempts = _attempt_logs(log_dir)
    assert sorted(attempts) == [0, 1], job.output()[-3000:]
    second = attempts[1]
    print(f"step-6 had .metadata at the kill: {metadata_at_kill}")
    warnings = [ln for ln in second.splitlines() if "skipped newer step folder" in ln]
    assert len(warnings) == 1, second[-3000:]
    assert "step-4: truncated file __0_0.distcp" in warnings[0], warnings
    if not metadata_at_kill:
        assert "step-6: no .metadata" in warnings[0], warnings
    assert f"Loading the checkpoint from {dump / 'checkpoint' / 'step-2'}." in second
    resumed = losses(second)
    assert sorted(resumed) == list(range(3, 9)), resumed
    assert resumed == {s: ref[s] for s in range(3, 9)}, (resumed, ref)
