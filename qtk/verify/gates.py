"""Quality gates: the one table of what a candidate must meet (``qtk verify``'s exit 3, ``qtk provision``'s
"never published").

Each :class:`Gate` row names the :class:`Gates` field (also the manifest key under ``[gates]``), the
``qtk verify`` option, the metric it reads from a candidate's report row and its direction. The manifest
schema, the CLI options, the check of a limit and the failure message all follow from the row, so a new
gate (a task-accuracy ``min_recovery``, say) is one row here plus one field on :class:`Gates`.

Fail closed, both ways:

* a limit must be a finite number in the gate's range: NaN, infinity and negative numbers are refused
  (``max_kld = nan`` would otherwise pass every candidate: NaN compares false with everything), and a
  share (top-1 agreement) is at most 100. Refused when :class:`Gates` is built, at manifest load (with
  the file and line) and on the command line;
* a metric that is not a finite number (NaN after an fp16 overflow, an infinite perplexity) fails its
  gate; a metric that cannot be measured (KL between different vocabularies) fails it too.

No numpy or torch here: manifests are read on the torch-free install.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .. import errors

__all__ = ["Gate", "GATES", "BY_NAME", "Gates", "check_gates", "gate_error", "limit_problem"]


def _kl(m: dict, key: str, scale: float = 1.0) -> float | None:
    kl = m.get("kl")
    return None if not kl or kl.get(key) is None else kl[key] * scale


def _recovery(m: dict) -> float | None:
    """Task accuracy recovery over all --tasks (qtk.verify.tasks.recovery: None when any is missing)."""
    return (m.get("recovery") or {}).get("overall")


def _worst_task(m: dict) -> tuple[str, float | None] | None:
    per = (m.get("recovery") or {}).get("tasks") or {}
    if not per:
        return None
    bad = [(t, v) for t, v in per.items() if v is None or not math.isfinite(v)]  # fails first, named
    return bad[0] if bad else min(per.items(), key=lambda kv: kv[1])


@dataclass(frozen=True)
class Gate:
    name: str  # the Gates field and the manifest key
    option: str  # the `qtk verify` option
    label: str  # what the metric is called in a failure
    direction: str  # "max": the metric must not exceed the limit; "min": must not fall below it
    metric: Callable[[dict], float | None]  # from a candidate's report row; None: not measurable
    missing: str  # the failure when the metric cannot be measured
    help: str
    fmt: str = ".4f"
    unit: str = ""
    upper: float | None = None  # the highest limit that means anything (a share: 100)
    detail: Callable[[dict], str | None] | None = None  # names what the metric came from (the worst task)

    def failure(self, m: dict, limit: float) -> str | None:
        """Why the candidate row ``m`` fails this gate at ``limit``, or None."""
        value = self.metric(m)
        where = f" ({d})" if self.detail and (d := self.detail(m)) else ""
        label = self.label + where
        if value is None:
            return self.missing + where
        if not math.isfinite(value):
            return f"{label} is not a finite number ({value})"
        if value > limit if self.direction == "max" else value < limit:
            sign = ">" if self.direction == "max" else "<"
            return f"{label} {value:{self.fmt}}{self.unit} {sign} {limit}{self.unit}"
        return None


GATES: tuple[Gate, ...] = (
    Gate("max_ppl_increase_pct", "--max-ppl-increase", "perplexity", "max", lambda m: m.get("ppl_increase_pct"),
         "perplexity not measurable", "Gate: candidate perplexity at most PCT% above the reference.",
         fmt="+.1f", unit="%"),
    Gate("max_kld", "--max-kld", "mean KLD", "max", lambda m: _kl(m, "mean"),
         "KLD not measurable (vocabularies differ)", "Gate: mean KL divergence from the reference at most X."),
    Gate("min_top1_pct", "--min-top1", "top-1 agreement", "min", lambda m: _kl(m, "top1_agreement", 100.0),
         "top-1 not measurable", "Gate: top-1 agreement with the reference at least PCT%.",
         fmt=".1f", unit="%", upper=100.0),
    Gate("min_recovery_pct", "--min-recovery", "task accuracy recovery", "min", _recovery,
         "task accuracy recovery not measured (no --tasks, or a task's accuracy missing or not finite)",
         "Gate: candidate/reference accuracy on --tasks, averaged over the tasks, at least PCT%.",
         fmt=".1f", unit="%"),
    Gate("min_task_recovery_pct", "--min-task-recovery", "task accuracy recovery", "min",
         lambda m: (_worst_task(m) or (None, None))[1],
         "task accuracy recovery not measured (no --tasks, or a task's accuracy missing or not finite)",
         "Gate: candidate/reference accuracy on every --tasks task at least PCT%.",
         fmt=".1f", unit="%", detail=lambda m: (_worst_task(m) or (None, None))[0]),
)
BY_NAME = {g.name: g for g in GATES}


def limit_problem(gate: Gate, value: object) -> str | None:
    """Why ``value`` cannot be ``gate``'s limit, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number (got {value!r})"
    if isinstance(value, int) and abs(value) > 1e300:  # math.isfinite(10**400) raises OverflowError
        return f"must be a finite number (got an integer of {len(str(abs(value)))} digits)"
    if not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if value < 0:
        return f"must be >= 0 (got {value})"
    if gate.upper is not None and value > gate.upper:
        return f"must be at most {gate.upper:g} (got {value})"
    return None


@dataclass(frozen=True)
class Gates:
    """The limits set for one candidate (None: that gate is off). One field per :data:`GATES` row."""

    max_ppl_increase_pct: float | None = None
    max_kld: float | None = None
    min_top1_pct: float | None = None
    min_recovery_pct: float | None = None
    min_task_recovery_pct: float | None = None
    require_smoke: bool = False

    def __post_init__(self) -> None:
        for g in GATES:
            value = getattr(self, g.name)
            if value is not None and (why := limit_problem(g, value)):
                raise errors.UsageError(f"Gate {g.name} {why}.", hint=f"Give {g.option} a finite number >= 0.")

    def limits(self) -> dict[str, float]:
        return {g.name: getattr(self, g.name) for g in GATES if getattr(self, g.name) is not None}



def check_gates(report: dict, gates: Gates) -> list[str]:
    """Annotate each candidate with its failed gates; return all failures ('model: gate ...')."""
    failures = []
    for m in report["models"][1:]:
        f = m["gate_failures"]
        for name, limit in gates.limits().items():
            if why := BY_NAME[name].failure(m, limit):
                f.append(why)
        if gates.require_smoke and (not m["smoke"] or not all(s["ok"] for s in m["smoke"])):
            bad = [s["name"] for s in m["smoke"] if not s["ok"]] or ["(smoke not run)"]
            f.append(f"smoke failed: {', '.join(bad)}")
        failures += [f"{m['name']}: {x}" for x in f]
    return failures


def gate_error(failures: list[str]) -> errors.GateFailedError:
    return errors.GateFailedError(
        f"{len(failures)} quality gate(s) failed:\n  " + "\n  ".join(failures),
        hint="Loosen the gate, or try another method / group size / calibration set.",
    )
