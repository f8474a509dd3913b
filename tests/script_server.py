"""Runs an experiments/ script's main() many times in one process, for the script tests.

A script test that runs, say, fit.py thirty times as thirty subprocesses pays thirty
Python and JAX start-ups, backbone loads and compilation-cache loads; the property it
checks (flags -> files, clear errors, scores equal to the library's) does not need a
fresh process each time. `run_script` sends the run to a server process that imported
the script once (one server per script and environment, per test process) and returns
what a subprocess would: a CompletedProcess with the return code, stdout and stderr.
The server does what absl's app.run does for each run: parse the flags (from their
defaults again, verbosity INFO), run main(argv), turn SystemExit, app.UsageError and
uncaught exceptions into the exit code and stderr text a real run prints. absl's log
lines go to the run's stderr, and Python warnings show again in each run (the warning
filters and registries are reset around it).

What stays a real subprocess: runs with an environment the server was not started
with (each environment has its own server), and the tests that are about processes
(the compilation cache across runs, several processes, isolation): they call
subprocess themselves. A few end-to-end subprocess runs remain in each script's tests.
Several processes joined by jax.distributed are each a server of their own, started by
the test with its requests in a file (tests/test_multihost.py), so one process pair
runs several evaluations.

Protocol: one JSON line per request on the server's stdin ({"args": [...], "cwd": ...}),
one JSON line per reply on its stdout, after the marker below; the script's own
output is captured, so it never mixes with the replies.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import traceback
import warnings

REPO = pathlib.Path(__file__).resolve().parents[1]
REPLY = "SCRIPT_SERVER_REPLY "  # Before each reply line (the protocol below).
_servers: dict[tuple, subprocess.Popen] = {}
_lock = threading.Lock()


_MAX_SERVERS = 4  # Per test process; the least recently used one is stopped beyond.
# Not part of a server's key: pytest sets it to the current test's id in os.environ, so
# with it each test would start servers of its own (no script reads it).
_PER_TEST_VARIABLES = ("PYTEST_CURRENT_TEST",)


def _server(script: str, env: dict[str, str]) -> subprocess.Popen:
  key = (script, tuple(sorted((k, v) for k, v in env.items() if k not in _PER_TEST_VARIABLES)))
  proc = _servers.pop(key, None)  # Re-inserted below: the dict's order is recency.
  if proc is None or proc.poll() is not None:
    while len(_servers) >= _MAX_SERVERS:
      _kill(_servers.pop(next(iter(_servers))))
    proc = subprocess.Popen([sys.executable, "-u", __file__, str(REPO / "experiments" / script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
  _servers[key] = proc
  return proc


def _kill(proc: subprocess.Popen) -> None:
  proc.kill()
  proc.wait()
  for stream in (proc.stdin, proc.stdout):
    stream.close()


@atexit.register
def _stop_all() -> None:
  for proc in _servers.values():
    _kill(proc)
  _servers.clear()


def run_script(script: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
  """experiments/<script> with `args`, as `subprocess.run(..., capture_output=True,
  text=True, env=env)` would run it, in a server process (see the module docstring).

  Raises subprocess.TimeoutExpired after `timeout` seconds (the server is killed)."""
  env = dict(os.environ if env is None else env)
  cmd = [sys.executable, str(REPO / "experiments" / script), *args]
  with _lock:
    proc = _server(script, env)
    proc.stdin.write(json.dumps({"args": list(args), "cwd": cwd or os.getcwd()}) + "\n")
    proc.stdin.flush()
    reply: dict = {}

    def read():
      for line in proc.stdout:
        if line.startswith(REPLY):
          reply.update(json.loads(line[len(REPLY):]))
          return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not reply:
      _kill(proc)
      if reader.is_alive():
        raise subprocess.TimeoutExpired(cmd, timeout)
      raise RuntimeError(f"the script server of {script} died")
  return subprocess.CompletedProcess(cmd, reply["returncode"], reply["stdout"],
                                     reply["stderr"])


def _serve(path: str) -> None:
  """The server: imports the script, then runs main() once per request."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location("script_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules["__main__"] = module  # app.usage prints __main__'s docstring.
  sys.argv = [path]
  absl_logging.use_absl_handler()
  handler = absl_logging.get_absl_handler().python_handler
  replies = sys.stdout
  for line in sys.stdin:
    request = json.loads(line)
    os.chdir(request["cwd"])
    out, err = io.StringIO(), io.StringIO()
    handler.stream = err
    code = 0
    warnings.onceregistry.clear()  # A warning shows once per run, as in a fresh process
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():  # (entering it also resets the modules' registries).
      try:
        flags.FLAGS.unparse_flags()
        try:
          argv = flags.FLAGS([path, *request["args"]])
        except flags.Error as e:
          sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                           "  Pass --helpshort or --helpfull to see help on flags.\n")
          code = 1
        else:
          if flags.FLAGS["verbosity"].using_default_value:  # As app.run: INFO by default.
            flags.FLAGS.verbosity = 0
          try:
            module.main(argv)
          except app.UsageError as e:
            app.usage(shorthelp=True, detailed_error=e, exitcode=None)
            code = e.exitcode
      except SystemExit as e:
        if e.code is None:
          code = 0
        elif isinstance(e.code, int):
          code = e.code
        else:  # sys.exit("message"): Python prints it and exits with 1.
          sys.stderr.write(f"{e.code}\n")
          code = 1
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        code = 1
    replies.write(REPLY + json.dumps({"returncode": code, "stdout": out.getvalue(),
                                       "stderr": err.getvalue()}) + "\n")
    replies.flush()


if __name__ == "__main__":
  _serve(sys.argv[1])
