"""Run `run.py` once per argument list, each time in a fresh process forked from one interpreter
that has already imported what `run.py` imports at module level (torch, the launcher).

    python tests/run_py_forked.py CASES.json   (run from the repository root)

CASES.json: a list of {"argv": [...], "stdout": path, "stderr": path, "env": {...} (optional,
added to the environment)}, run one after the other. Each child runs run.py as `python run.py
ARGV` would (`__main__`, sys.argv set, fds 1 and 2 on the given files, exit status from
SystemExit, an uncaught exception printed as a traceback with exit status 1, then the normal
interpreter exit: atexit handlers, non-daemon threads joined), so the checks see what a fresh
process shows; the parent pays the ~4 s import once instead of once per case. Prints a JSON list
of {"returncode", "elapsed"}: elapsed counts the shared import too.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import traceback


def _child(case: dict) -> int:
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(case.get("env", {}))
    sys.argv = ["run.py", *case["argv"]]
    code = 0
    try:
        runpy.run_path("run.py", run_name="__main__")
    except SystemExit as e:  # as the interpreter maps it
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_forked(argvs: list[list[str]], folder, env: dict[str, str], *,
               case_env: dict[str, str] | None = None, timeout: float = 300.0) -> list[dict]:
    """The tests' side: run `python run.py ARGV` for each argument list through this script in a
    subprocess (environment `env`, each child adding `case_env`), outputs under `folder`.
    Returns per case {"returncode", "stdout", "stderr", "elapsed"}."""
    import subprocess
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = [{"argv": list(argv), "stdout": str(folder / f"{i}.out"),
              "stderr": str(folder / f"{i}.err"), "env": dict(case_env or {})}
             for i, argv in enumerate(argvs)]
    (folder / "cases.json").write_text(json.dumps(cases))
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, __file__, str(folder / "cases.json")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout * len(argvs))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return [{**res, "stdout": Path(c["stdout"]).read_text(errors="replace"),
             "stderr": Path(c["stderr"]).read_text(errors="replace")}
            for c, res in zip(cases, results)]


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    sys.path[0] = os.getcwd()  # as for `python run.py`: the script's folder, the repository root
    start = time.monotonic()
    import torchtitan_ext.titan.launch  # noqa: F401  (run.py's only module-level import)

    imported = time.monotonic() - start
    results = []
    for case in cases:
        t0 = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # Leaves the loop and main() by SystemExit: the child exits as the interpreter does.
            sys.exit(_child(case))
        _, status = os.waitpid(pid, 0)
        results.append({"returncode": os.waitstatus_to_exitcode(status),
                        "elapsed": imported + time.monotonic() - t0})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
