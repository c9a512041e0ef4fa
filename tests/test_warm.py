"""Warm start (warm.py): a command run through the server behaves as the same command in a fresh process.

The subprocess tests share one server (module fixture) in a private folder; a probe plugin, loaded by
the command with --plugin, writes what the command's process sees, one JSON line per process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error

from autotransfer import warm

SLOW_PLUGIN = Path(__file__).parent / "plugin_examples" / "slow_epochs_plugin.py"
TINY = ["--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained", "--image-size", "16",
        "--frozen-stages", "0", "--heads", "linear", "--no-portfolio", "--epochs", "1"]
PROBE = '''
import json, os, signal, sys
import numpy, torch
with open({out!r}, "a") as handle:
    handle.write(json.dumps({{"pid": os.getpid(), "ppid": os.getppid(), "comm": open("/proc/self/comm").read().strip(),
        "cwd": os.getcwd(), "umask": os.umask(0o022), "stdout_tty": os.isatty(1), "argv": sys.argv,
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
        "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, "draw": float(numpy.random.rand())}}) + "\\n")
'''
# The caller's side: SIGINT handled even when these tests run as a background job, whose children start
# with it ignored (as test_distributed's cli_taking_ctrl_c).
CALLER = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from autotransfer.entry import run; run()")


def caller(*args: str) -> list[str]:
    return [sys.executable, "-c", CALLER, *args]


def probe(folder: Path, name: str = "probe") -> tuple[Path, Path]:
    out = folder / f"{name}.jsonl"
    plugin = folder / f"{name}_plugin.py"
    plugin.write_text(PROBE.format(out=str(out)))
    return plugin, out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, timeout_s: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def long_search(env: dict, folder: Path) -> tuple[subprocess.Popen, dict]:
    """A served search that trains for minutes, and what its command's process saw (the probe's line)."""
    plugin, out = probe(folder)
    process = subprocess.Popen(caller("search", *TINY, "--epochs", "50", "--trials", "1", "--pruner", "none",
                                      "--out", str(folder / "run"), "--plugin", str(SLOW_PLUGIN), "--plugin",
                                      str(plugin), "--quiet"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        return process, wait_for(lambda: lines(out), 120, "the command to load its plugins")[0]
    except BaseException:
        process.kill()
        raise


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(environment, server pid): a ready server in a private folder, stopped after the module."""
    # A folder whose sockets' paths are too long for a socket address, as pytest's and many home folders are.
    long = tmp_path_factory.mktemp("warm") / ("w" * 80)
    env = {**os.environ, warm.ENV_SWITCH: "1", warm.ENV_DIR: str(long),
           warm.ENV_IDLE: "600", "SLOW_EPOCH_S": "1.5"}
    started = subprocess.run([sys.executable, "-m", "autotransfer", "server", "start"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0 and "started: pid" in started.stdout, started.stderr
    pid = int(started.stdout.split("pid")[1])
    yield env, pid
    subprocess.run([sys.executable, "-m", "autotransfer", "server", "stop"], env=env, timeout=60)
    assert wait_for(lambda: not warm._alive(pid), 60, "the server to stop")


# --------------------------------------------------------------------------- which server, where

def test_the_key_ignores_what_is_read_late_and_nothing_else(monkeypatch):
    env = {"PATH": "/usr/bin", "HOME": "/home/u", "OMP_NUM_THREADS": "2"}
    base = warm.key(env)
    assert warm.key({**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "3", "PWD": "/elsewhere"}) == base
    assert warm.key({**env, "HF_HUB_OFFLINE": "1"}) != base  # read at import by huggingface_hub
    assert warm.key({**env, "PATH": "/bin"}) != base


def test_an_edited_package_file_gets_a_new_server(tmp_path, monkeypatch):
    env = {"PATH": "/usr/bin"}
    base = warm.key(env)
    module = Path(warm.__file__)
    info = module.stat()
    try:
        os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
        assert warm.key(env) != base
    finally:
        os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert warm.key(env) == base


def test_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="not private"):
        warm.folder({warm.ENV_DIR: str(shared)})
    assert warm.Place.of({warm.ENV_DIR: str(shared)}) is None  # so commands run without a server
    private = warm.folder({warm.ENV_DIR: str(tmp_path / "private")})
    assert private.stat().st_mode & 0o777 == 0o700


def test_a_socket_whose_path_is_too_long_for_an_address_is_reached_through_its_folder(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    path = deep / "k.sock"
    assert len(str(path)) > 108  # more than sun_path holds
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.chdir(deep)
    listener.bind(path.name)  # as the server binds it
    listener.listen(1)
    monkeypatch.chdir(tmp_path)
    connection = warm._connect(path)
    accepted, _ = listener.accept()
    connection.sendall(b"x")
    assert accepted.recv(1) == b"x"
    for handle in (connection, accepted, listener):
        handle.close()


def test_the_switch_turns_it_off():
    assert not warm.enabled({warm.ENV_SWITCH: "0"})
    assert warm.enabled({}) == warm.supported()


# --------------------------------------------------------------------------- through a server

needs_fork = pytest.mark.skipif(not warm.supported(), reason="warm servers need Linux (fork, pidfd, fd passing)")


@needs_fork
@pytest.mark.slow
def test_a_command_runs_in_a_fork_of_the_server_as_the_caller_would_run_it(served, tmp_path):
    env, server = served
    plugin, out = probe(tmp_path)
    work = tmp_path / "here"
    work.mkdir()

    def caller_state(ignore: bool):  # what a caller may differ in besides its arguments
        def apply() -> None:
            os.umask(0o027)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN if ignore else signal.SIG_DFL)
        return apply

    runs = [subprocess.run([sys.executable, "-m", "autotransfer", "plugins", "--plugin", str(plugin)], cwd=work,
                           env={**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}, capture_output=True,
                           text=True, timeout=120, preexec_fn=caller_state(ignore)) for ignore in (True, False)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert "probe_plugin" in result.stdout  # the listing came through the caller's own stdout pipe
    seen = lines(out)
    assert len(seen) == 2
    for line in seen:
        assert line["ppid"] == server and line["comm"] == "at:plugins"
        assert line["cwd"] == str(work) and line["umask"] == 0o027
        assert line["cuda_visible"] == "" and line["threads"] == 1 and not line["stdout_tty"]
        assert line["argv"][1:] == ["plugins", "--plugin", str(plugin)]
    assert [line["usr1_ignored"] for line in seen] == [True, False]  # the caller's, each time
    assert seen[0]["pid"] != seen[1]["pid"] and seen[0]["draw"] != seen[1]["draw"]  # numpy reseeded per command


@needs_fork
@pytest.mark.slow
def test_bad_input_through_the_server_is_one_line_and_status_2(served, tmp_path):
    env, server = served
    plugin, out = probe(tmp_path)
    result = subprocess.run([sys.executable, "-m", "autotransfer", "search", "--dataset", str(tmp_path / "missing"),
                             "--plugin", str(plugin), "--out", str(tmp_path / "o")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "does not exist" in one_line_error(result) or "missing" in one_line_error(result)
    assert [line["ppid"] for line in lines(out)] == [server]


@needs_fork
@pytest.mark.slow
def test_ctrl_c_reaches_the_command_which_records_it_and_exits_130(served, tmp_path):
    env, _ = served
    import optuna

    out = tmp_path / "run"
    process = subprocess.Popen(caller("search", *TINY, "--epochs", "4", "--trials", "2", "--pruner", "none",
                                      "--out", str(out), "--plugin", str(SLOW_PLUGIN), "--quiet"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{out / 'study.db'}"

    def running() -> bool:
        if not (out / "study.db").exists():
            return False
        try:
            trials = optuna.load_study(study_name="digits-0-2", storage=storage).get_trials()
        except Exception:  # noqa: BLE001 - the study is still being created
            return False
        return any(t.state.name == "RUNNING" and t.intermediate_values for t in trials)

    try:
        wait_for(running, 180, "a trial past its first epoch")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    trials = optuna.load_study(study_name="digits-0-2", storage=storage).get_trials()
    assert any(t.user_attrs.get("reason", "").startswith("interrupted") for t in trials)


@needs_fork
@pytest.mark.slow
def test_a_caller_killed_outright_takes_its_command_with_it(served, tmp_path):
    env, server = served
    process, command = long_search(env, tmp_path)
    try:
        assert command["ppid"] == server and command["pid"] != process.pid
        process.kill()
        process.wait(timeout=30)
        wait_for(lambda: not warm._alive(command["pid"]), 60, "the command to die with its caller")
    finally:
        if process.poll() is None:
            process.kill()


@needs_fork
@pytest.mark.slow
def test_local_workers_are_forks_of_the_server_too(served, tmp_path):
    env, server = served
    plugin, out = probe(tmp_path)
    result = subprocess.run([sys.executable, "-m", "autotransfer", "search", *TINY, "--trials", "2", "--workers", "2",
                             "--plugin", str(plugin), "--out", str(tmp_path / "run"), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = lines(out)
    assert sorted(line["comm"] for line in seen) == ["at:search", "at:worker", "at:worker"]
    assert {line["ppid"] for line in seen} == {server}
    assert all(line["threads"] == 1 for line in seen if line["comm"] == "at:worker")  # 2 cores / 2 workers, or 1


@needs_fork
@pytest.mark.slow
def test_without_a_server_the_command_runs_here_then_starts_one_that_exits_when_idle(tmp_path):
    env = {**os.environ, warm.ENV_SWITCH: "1", warm.ENV_DIR: str(tmp_path / "warm"), warm.ENV_IDLE: "1"}
    plugin, out = probe(tmp_path)
    result = subprocess.run([sys.executable, "-m", "autotransfer", "search", *TINY, "--trials", "1", "--plugin",
                             str(plugin), "--out", str(tmp_path / "run"), "--quiet"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "starting a warm server" in result.stderr
    assert lines(out)[0]["comm"] != "at:search"  # it ran in its own process
    found = wait_for(lambda: [s for s in warm.servers(env) if s[2] == "ready"], 300, "the new server to be ready")
    pid = found[0][0]
    wait_for(lambda: not warm._alive(pid), 60, "the idle server to exit")
    assert not list((tmp_path / "warm").glob("*.sock")) and not list((tmp_path / "warm").glob("*.pid"))


@needs_fork
@pytest.mark.slow
def test_stopping_a_server_lets_its_running_command_finish_and_report(tmp_path):
    env = {**os.environ, warm.ENV_SWITCH: "1", warm.ENV_DIR: str(tmp_path / "warm"), "SLOW_EPOCH_S": "1.5"}
    started = subprocess.run([sys.executable, "-m", "autotransfer", "server", "start"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    server = int(started.stdout.split("pid")[1])
    plugin, out = probe(tmp_path)
    process = subprocess.Popen(caller("search", *TINY, "--epochs", "3", "--trials", "1", "--pruner", "none",
                                      "--out", str(tmp_path / "run"), "--plugin", str(SLOW_PLUGIN), "--plugin",
                                      str(plugin), "--quiet"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: lines(out), 120, "the command to start")[0]["ppid"] == server
        stop = subprocess.Popen([sys.executable, "-m", "autotransfer", "server", "stop"], env=env,
                                stdout=subprocess.PIPE, text=True)
        wait_for(lambda: not list((tmp_path / "warm").glob("*.sock")), 60, "the server to stop taking commands")
        assert warm._alive(server)  # still reporting for its running command
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert f"pid {server}" in stop.communicate(timeout=60)[0]
        wait_for(lambda: not warm._alive(server), 60, "the server to exit after its command")
    finally:
        if process.poll() is None:
            process.kill()


def _ended(command, atexit_file: Path) -> tuple[str, int]:
    """Run `command` through run_and_exit in a forked child, as a served command is; how the child ended."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            import atexit

            atexit.register(lambda: atexit_file.write_text("ran"))
            sys.stderr = open(os.devnull, "w")
            warm.run_and_exit(command, [])
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return ("signal", os.WTERMSIG(status)) if os.WIFSIGNALED(status) else ("exit", os.WEXITSTATUS(status))


@needs_fork
def test_a_forked_command_ends_as_a_fresh_process_would(tmp_path):
    def returns(argv):
        return 3

    def exits(argv):
        raise SystemExit(2)

    def fails(argv):
        raise RuntimeError("boom")

    def interrupted(argv):
        raise KeyboardInterrupt

    def exits_minus_one(argv):
        raise SystemExit(-1)

    cases = [(returns, ("exit", 3)), (exits, ("exit", 2)), (fails, ("exit", 1)), (exits_minus_one, ("exit", 255)),
             (interrupted, ("signal", signal.SIGINT))]
    for index, (command, expected) in enumerate(cases):
        marker = tmp_path / f"atexit-{index}"
        assert _ended(command, marker) == expected, command.__name__
        assert marker.read_text() == "ran"  # atexit handlers run, as at a normal exit


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


@needs_fork
@pytest.mark.slow
def test_ctrl_z_stops_the_command_with_its_caller_and_fg_continues_both(served, tmp_path):
    env, _ = served
    process, started = long_search(env, tmp_path)
    command = started["pid"]
    try:
        process.send_signal(signal.SIGTSTP)
        wait_for(lambda: _process_state(command) == "T" and _process_state(process.pid) == "T", 30, "both stopped")
        process.send_signal(signal.SIGCONT)
        wait_for(lambda: _process_state(command) != "T" and _process_state(process.pid) != "T", 30, "both running")
    finally:
        process.kill()
        process.wait(timeout=30)
    wait_for(lambda: not warm._alive(command), 60, "the command to die with its caller")


@needs_fork
def test_a_caller_ends_as_its_command_did_even_by_sigkill():
    for status in (("exit", 7), ("signal", signal.SIGTERM), ("signal", signal.SIGKILL)):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                warm.exit_like(status)
            finally:
                os._exit(99)
        _, raw = os.waitpid(pid, 0)
        ended = ("signal", os.WTERMSIG(raw)) if os.WIFSIGNALED(raw) else ("exit", os.WEXITSTATUS(raw))
        assert ended == status
