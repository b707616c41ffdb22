"""Hardware reference figures measured in the running process (for MFU)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import resource
import time

import jax
import jax.numpy as jnp


@functools.cache
def matmul_peak_flops(n: int = 2048, repeats: int = 5, min_seconds: float = 1.0,
                      dtype: str = "float32") -> float:
    """Best observed FLOP/s of an n×n matmul of ``dtype`` operands on the default device.

    Runs at least ``repeats`` timed matmuls and at least ``min_seconds`` of them, so that thread
    pools and clock frequencies have settled before the best time is taken (a single cold
    measurement can read a third low, which would inflate every MFU divided by it).
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    return 2 * n**3 / min(_call_times(jax.jit(jnp.matmul), (a, b), repeats, min_seconds))


def _call_times(fn, args: tuple, repeats: int, min_seconds: float) -> list[float]:
    """Seconds of each of at least ``repeats`` calls of ``fn(*args)`` spanning at least
    ``min_seconds``, after one untimed call (the compile)."""
    fn(*args).block_until_ready()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return times


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# --- A compiled program's matmuls, timed alone ------------------------------------------------
#
# Every dot a compiled program runs, read from its optimized HLO (inside fusions and loop bodies,
# times the loops' trip counts), each then timed alone at its shapes: the sum is the time the
# program's matmuls take at the rates this machine's kernels reach for those shapes, each using
# every core. Set beside the program's own time, it says how much of that is the matmuls.

_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|to_apply|condition)=%([\w.\-]+)")
_LIST_CALLS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DIMS = re.compile(r"\b(lhs_batch_dims|lhs_contracting_dims|rhs_batch_dims|"
                   r"rhs_contracting_dims)=\{([\d,]*)\}")


@dataclasses.dataclass(frozen=True)
class Dot:
    """One matmul of a compiled program: operand and result types and shapes, dimension numbers
    (as lax.dot_general takes them), and how many times one execution runs it."""

    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    out: tuple[str, tuple[int, ...]]
    dimension_numbers: tuple
    count: int

    @property
    def flops(self) -> int:
        """2 x output elements x contracted extent, per run."""
        (contracting, _), _ = self.dimension_numbers
        return 2 * math.prod(self.out[1]) * math.prod(self.lhs[1][i] for i in contracting)


_HLO_TYPES = {"f64": "float64", "f32": "float32", "bf16": "bfloat16", "f16": "float16",
              "s32": "int32", "s8": "int8", "u8": "uint8", "s64": "int64"}


def _shape(text: str) -> tuple[str, tuple[int, ...]] | None:
    """'f32[4096,384]{1,0} ...' -> ("float32", (4096, 384)); None for tuples and tokens."""
    m = _SHAPE.match(text.strip())
    if not m or m.group(1) not in _HLO_TYPES:
        return None
    return _HLO_TYPES[m.group(1)], tuple(int(d) for d in m.group(2).split(",") if d)


def hlo_dots(hlo_text: str) -> list[Dot]:
    """The dots of an optimized HLO module's text (``compiled.as_text()``), each with the number
    of times one execution of the entry computation runs it: a dot in a while loop's body counts
    the loop's known trip count (XLA records it for scans; a loop without one counts once)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith((" ", "HloModule")):
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    calls: dict[str, list[tuple[str, int]]] = {}
    for name, lines in comps.items():
        out = []
        for line in lines:
            trip = _TRIP.search(line)
            for kind, callee in _CALLS.findall(line):
                out.append((callee, int(trip.group(1)) if kind == "body" and trip else 1))
            for group in _LIST_CALLS.findall(line):
                out.extend((c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip())
        calls[name] = out
    mult: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        mult[name] = mult.get(name, 0) + times
        for callee, trip in calls.get(name, []):
            if callee in comps:
                visit(callee, times * trip)

    visit(entry, 1)
    dots = []
    for name, lines in comps.items():
        if not mult.get(name):
            continue
        shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            shape = _shape(m.group(2))
            if shape is not None:
                shapes[m.group(1)] = shape
            rest = m.group(2)
            if " dot(" not in rest or shape is None:
                continue
            operands = re.search(r" dot\(%([\w.\-]+),\s*%([\w.\-]+)\)", rest)
            if not operands or operands.group(1) not in shapes or operands.group(2) not in shapes:
                raise ValueError(f"cannot read the operands of a dot in {name}: {line.strip()}")
            dims = {k: tuple(int(d) for d in v.split(",") if d) for k, v in _DIMS.findall(rest)}
            numbers = ((dims.get("lhs_contracting_dims", ()), dims.get("rhs_contracting_dims", ())),
                       (dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())))
            dots.append(Dot(shapes[operands.group(1)], shapes[operands.group(2)], shape,
                            numbers, mult[name]))
    return dots


def time_dot(dot: Dot, repeats: int = 10, min_seconds: float = 0.2) -> float:
    """Median seconds of ``dot`` run alone (random operands of its types and shapes, jitted),
    over at least ``repeats`` runs and ``min_seconds``. The operands are in the default
    row-major layout, whichever layout XLA gave them inside the program."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], dot.lhs[1], jnp.float32).astype(dot.lhs[0])
    b = jax.random.normal(keys[1], dot.rhs[1], jnp.float32).astype(dot.rhs[0])
    # The result type only when it differs from the operands' (bfloat16 in, float32 out): as the
    # program's own dot.
    wider = None if dot.out[0] == dot.lhs[0] else jnp.dtype(dot.out[0])
    fn = jax.jit(functools.partial(jax.lax.dot_general, dimension_numbers=dot.dimension_numbers,
                                   preferred_element_type=wider))
    times = sorted(_call_times(fn, (a, b), repeats, min_seconds))
    return float(times[len(times) // 2])


def dots_alone(hlo_text: str, top: int = 8) -> dict:
    """A compiled program's dots timed alone (see above): their FLOPs per execution, the sum of
    their times, and the ``top`` dots by that time (shapes, runs per execution, ms each,
    GFLOP/s). Dots with the same types, shapes and dimension numbers are timed once."""
    merged: dict[tuple, int] = {}
    for dot in hlo_dots(hlo_text):
        key = (dot.lhs, dot.rhs, dot.out, dot.dimension_numbers)
        merged[key] = merged.get(key, 0) + dot.count
    parts: list[dict] = []
    for (lhs, rhs, out, numbers), count in merged.items():
        dot = Dot(lhs, rhs, out, numbers, count)
        seconds = time_dot(dot)
        parts.append({"lhs": f"{lhs[0]}{list(lhs[1])}", "rhs": f"{rhs[0]}{list(rhs[1])}",
                      "dimension_numbers": [list(map(list, p)) for p in numbers],
                      "runs": count, "ms_each": seconds * 1e3,
                      "gflops_per_s": dot.flops / seconds / 1e9,
                      "flops": dot.flops * count, "seconds": seconds * count})
    parts.sort(key=lambda p: -p["seconds"])
    return {"matmul_flops": sum(p["flops"] for p in parts),
            "seconds": sum(p["seconds"] for p in parts),
            "distinct_dots": len(parts), "slowest_dots": parts[:top]}
