"""Progress lines and stage timings for long loops, shared by the detectors.

  progress = Progress("images: scored", total)       # one per loop
  for start in range(0, total, step):
    ...
    progress.update(min(start + step, total))
  # -> "images: scored 96 / 400 images (24%), 3.1 images/s, about 1 min 38 s left"

A Progress logs at most once every `every_s` seconds (never for a loop that ends
sooner) and a closing line when the loop ends if it logged before. Code that runs an
inner loop as part of its own (a folder scored chunk by chunk) silences the inner
lines with `quiet()` and reports the whole with its own Progress.

Stage timings: `stage(name)` blocks add their seconds to every `record_stages()`
collector open in the same context (thread / asyncio task), e.g.

  with record_stages() as seconds:         # the caller, e.g. the evaluation loop
    scores, maps = spade.score(index, images)
  seconds  # {"backbone": 1.2, "search": 3.4, "maps": 0.5}

  with stage("search") as s:               # inside the detector
    scores = s.ready(image_scores(...))    # waits for the device only while recording

JAX dispatches asynchronously, so a stage's time is only its own if its results are
ready when it ends: `ready(x)` blocks on x when a collector is open and is a no-op
otherwise (the library's own calls keep their overlap of host and device work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import time
from typing import Any, TypeVar

from absl import logging

T = TypeVar("T")

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("spade_jax_quiet_progress",
                                                              default=False)
_COLLECTORS: contextvars.ContextVar[tuple[dict[str, float], ...]] = contextvars.ContextVar(
    "spade_jax_stage_collectors", default=())


def format_duration(seconds: float) -> str:
  """'42 s', '3 min 5 s', '2 h 7 min' (rounded to whole seconds / minutes)."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f"{seconds:.0f} s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {secs} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes} min"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
  """Progress objects updated inside this block log nothing (their caller reports)."""
  token = _QUIET.set(True)
  try:
    yield
  finally:
    _QUIET.reset(token)


class Progress:
  """Logs `label done / total unit (pct), rate unit/s, about T left`, rate-limited.

  Attributes:
    lines: every line logged so far (what `log` received).
  """

  def __init__(self, label: str, total: int, *, unit: str = "images", every_s: float = 10.0,
               log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic):
    """label: what is counted ('images: scored'); total: how many in all (>= 0); log: the
    sink (default absl logging.info); clock: seconds (a fake one in tests)."""
    self.label = label
    self.total = int(total)
    self.unit = unit
    self.every_s = float(every_s)
    self._log = log
    self._clock = clock
    self._start = clock()
    self._last = self._start
    self.lines: list[str] = []

  def _emit(self, line: str) -> None:
    self.lines.append(line)
    if self._log is None:
      logging.info("%s", line)
    else:
      self._log(line)

  def update(self, done: int) -> str | None:
    """Reports that `done` of `total` are finished; returns the line if one was logged."""
    if _QUIET.get():
      return None
    now = self._clock()
    elapsed = now - self._start
    rate = done / elapsed if elapsed > 0 else float("inf")
    if done >= self.total:
      if not self.lines:
        return None  # A short loop: nobody waited for it.
      line = (f"{self.label} {done} / {self.total} {self.unit} in "
              f"{format_duration(elapsed)} ({rate:.3g} {self.unit}/s)")
    elif now - self._last >= self.every_s:
      percent = 100.0 * done / self.total if self.total else 100.0
      left = (self.total - done) / rate if rate > 0 else float("inf")
      eta = format_duration(left) if left != float("inf") else "unknown time"
      line = (f"{self.label} {done} / {self.total} {self.unit} ({percent:.0f}%), "
              f"{rate:.3g} {self.unit}/s, about {eta} left")
    else:
      return None
    self._last = now
    self._emit(line)
    return line


@contextlib.contextmanager
def record_stages() -> Iterator[dict[str, float]]:
  """Collects {stage name: seconds} of the stage() blocks run inside this block.

  Collectors nest: an inner one's stages count in the outer ones too.
  """
  seconds: dict[str, float] = {}
  token = _COLLECTORS.set((*_COLLECTORS.get(), seconds))
  try:
    yield seconds
  finally:
    _COLLECTORS.reset(token)


class _Stage:
  """The handle of a running stage() block."""

  def __init__(self, active: bool):
    self.active = active

  def ready(self, value: T) -> T:
    """`value` once its device arrays are computed (no wait unless a collector is open)."""
    if self.active:
      import jax  # pylint: disable=import-outside-toplevel
      jax.block_until_ready(value)
    return value


@contextlib.contextmanager
def stage(name: str) -> Iterator[_Stage]:
  """Adds the block's wall time to `name` in every open record_stages() collector."""
  collectors = _COLLECTORS.get()
  start = time.perf_counter()
  try:
    yield _Stage(bool(collectors))
  finally:
    elapsed = time.perf_counter() - start
    for seconds in collectors:
      seconds[name] = seconds.get(name, 0.0) + elapsed


def stage_totals(seconds: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
  """{name: seconds} for each of `names` (0.0 for a stage that never ran)."""
  return {name: float(seconds.get(name, 0.0)) for name in names}
