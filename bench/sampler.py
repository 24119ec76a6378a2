"""`python -m bench.sampler OUT.json serve ...`: the real server under a stack sampler.

cProfile's cumulative times are wrong for this server: SQLAlchemy's asyncio layer runs the
ORM inside greenlets, and a greenlet switch looks to cProfile like a call that never
returns, so coroutine frames collect wall time (cumulative shares above 100%). This
sampler takes a wall-clock SIGALRM every BENCH_SAMPLE_MS (default 2); the handler runs on
the main thread at the interrupted bytecode and records its stack, plus, inside a
SQLAlchemy greenlet, the stack of the coroutine that spawned it (greenlet frames are not
linked to their parent's), so inclusive time per function is right. A sample whose top
frame is selectors' select() is the event loop waiting (idle). SIGUSR1 clears the samples
(sent when the measured load starts). At exit the counted stacks go to OUT.json;
`summarize` turns them into text.

py-spy (BENCH_PROFILER=py-spy) samples from outside the process, with no code in it;
it does not link greenlet frames to their coroutine, so SQLAlchemy time shows under the
greenlet instead of the capi_server function that ran the query. `from_py_spy` converts
its raw output to the same JSON, so both print the same summary.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType

import greenlet  # type: ignore[import-untyped]

Frame = tuple[str, int, str]  # (file, first line, function)


class StackSampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: Counter[tuple[Frame, ...]] = Counter()

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._sample)
        signal.signal(signal.SIGUSR1, lambda *_: self.samples.clear())
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        stack: list[Frame] = []
        current = frame
        while current is not None:
            code = current.f_code
            stack.append((code.co_filename, code.co_firstlineno, code.co_name))
            current = current.f_back
        parent = greenlet.getcurrent().parent
        if parent is not None:
            current = parent.gr_frame
            while current is not None:
                code = current.f_code
                stack.append((code.co_filename, code.co_firstlineno, code.co_name))
                current = current.f_back
        self.samples[tuple(stack)] += 1

    def dump(self, path: Path) -> None:
        rows = [[[list(f) for f in stack], count] for stack, count in self.samples.items()]
        path.write_text(json.dumps({"interval": self.interval, "stacks": rows}))


AREAS = (
    ("sqlalchemy", "/sqlalchemy/"),
    ("psycopg", "/psycopg"),
    ("grpc", "/grpc"),
    ("protobuf", "/google/protobuf"),
    ("asyncio", "/asyncio/"),
    ("logging", "/logging/"),
    ("json", "/json/"),
    ("httpx/httpcore", "/httpx"),
    ("httpx/httpcore", "/httpcore/"),
    ("openai", "/openai/"),
    ("pydantic", "/pydantic"),
    ("phonenumbers", "/phonenumbers/"),
    ("uuid", "/uuid.py"),
    ("capi_server", "/capi_server/"),
)


def from_py_spy(raw: Path, out: Path, rate: int) -> None:
    """py-spy's `--format raw --full-filenames` stacks (root first, "func (file:line)")
    of the main thread, as the sampler's JSON (top frame first)."""
    stacks: Counter[tuple[Frame, ...]] = Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit() or "_run_module_as_main" not in stack_text:
            continue  # another thread (grpc's poller, the metrics endpoint)
        frames: list[Frame] = []
        for text in stack_text.split(";"):
            name, _, where = text.rpartition(" (")
            filename, _, number = where.rstrip(")").rpartition(":")
            frames.append((filename, int(number) if number.isdigit() else 0, name))
        stacks[tuple(reversed(frames))] += int(count)
    rows = [[[list(f) for f in stack], count] for stack, count in stacks.items()]
    out.write_text(json.dumps({"interval": 1 / rate, "stacks": rows}))


def area_of(filename: str) -> str:
    """The library a source file belongs to (\"other\" when none of AREAS)."""
    return next((a for a, marker in AREAS if marker in filename), "other")


def short(frame: Frame) -> str:
    filename, line, name = frame
    for marker in ("site-packages/", "/server/", "/lib/python3.11/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"


def _idle(stack: tuple[Frame, ...]) -> bool:
    """The event loop waiting in epoll: the top frame is selectors' select()."""
    return bool(stack) and stack[0][2] == "select" and stack[0][0].endswith("selectors.py")


def summarize(path: Path, top: int = 30) -> str:
    """Busy share, own time by library, and inclusive time of the hottest functions."""
    data = json.loads(path.read_text())
    stacks = [(tuple(tuple(f) for f in stack), int(count)) for stack, count in data["stacks"]]
    total = sum(count for _, count in stacks) or 1
    busy = [(s, c) for s, c in stacks if s and not _idle(s)]
    busy_total = sum(c for _, c in busy) or 1
    own_area: Counter[str] = Counter()
    own_function: Counter[Frame] = Counter()
    inclusive: Counter[Frame] = Counter()
    inclusive_area: Counter[str] = Counter()
    for stack, count in busy:
        own_area[area_of(stack[0][0])] += count
        own_function[stack[0]] += count
        for frame in set(stack):
            inclusive[frame] += count
        for area in {area_of(f[0]) for f in stack}:
            inclusive_area[area] += count
    lines = [
        f"Stack samples of the server's main thread: {total} samples every "
        f"{data['interval'] * 1000:.0f} ms; busy (not waiting in epoll) {busy_total / total:.0%}.",
        "Shares below are of the busy samples.",
        "",
        "Own time by library (the frame on top of the stack):",
    ]
    for area, count in own_area.most_common():
        lines.append(f"  {area:<16} {count / busy_total:6.1%}")
    lines += ["", "Inclusive time by library (a frame of it anywhere on the stack):"]
    for area, count in inclusive_area.most_common():
        lines.append(f"  {area:<16} {count / busy_total:6.1%}")
    lines += ["", f"Top {top} capi_server functions by inclusive time:"]
    ours = [(f, c) for f, c in inclusive.most_common() if "/capi_server/" in f[0]][:top]
    lines += [f"  {c / busy_total:6.1%}  {short(f)}" for f, c in ours]
    lines += ["", f"Top {top} library functions by inclusive time:"]
    theirs = [
        (f, c)
        for f, c in inclusive.most_common()
        if not any(m in f[0] for m in ("/capi_server/", "/asyncio/", "/bench/", "<"))
    ][:top]
    lines += [f"  {c / busy_total:6.1%}  {short(f)}" for f, c in theirs]
    lines += ["", f"Top {top} functions by own time:"]
    lines += [f"  {c / busy_total:6.1%}  {short(f)}" for f, c in own_function.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    out = Path(sys.argv[1])
    sampler = StackSampler(float(os.environ.get("BENCH_SAMPLE_MS", "2")) / 1000)

    def finish() -> None:
        sampler.stop()
        sampler.dump(out)

    atexit.register(finish)
    sampler.start()
    from capi_server.__main__ import main as serve

    started = time.monotonic()
    code = serve(sys.argv[2:])
    print(f"sampler: {time.monotonic() - started:.0f}s sampled", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
