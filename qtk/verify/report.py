"""Render a verify report: a rich table, Markdown, and a PNG plot (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Group
from rich.table import Table

__all__ = ["table", "markdown", "plot", "rows", "task_names", "task_columns", "task_rows"]

COLUMNS = ("model", "format", "size MB", "ppl ± se", "Δppl", "KLD mean", "KLD p99", "top-1", "smoke ok",
           "correct", "prefill tok/s", "decode tok/s", "TTFT s", "load s")


def short_name(name: str) -> str:
    """A readable label: org/repo for a cache snapshot, the file or folder name otherwise."""
    parts = name.rstrip("/").split("/")
    for i, p in enumerate(parts):
        if p.startswith(("models--", "datasets--")) and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            repo = p.split("--", 1)[1].replace("--", "/")
            rest = parts[i + 3:]
            return repo + (f":{'/'.join(rest)}" if rest else "")
    return parts[-1] if "/" in name and not (len(parts) == 2 and not name.startswith((".", "/"))) else name


def rows(report: dict) -> list[list[str]]:
    out = []
    for m in report["models"]:
        p, kl, smoke = m["perplexity"], m.get("kl"), m.get("smoke") or []
        dec = [s["decode_tps"] for s in smoke if s["decode_tps"]]
        ttft = [s["ttft_s"] for s in smoke]
        out.append([
            short_name(m["name"]) + (" (ref)" if m["role"] == "reference" else ""),
            m["format"],
            f"{m['size_bytes'] / 1e6:.0f}",
            f"{p['ppl']:.3f} ± {p['stderr']:.3f}",
            "—" if m.get("ppl_increase_pct") is None else f"{m['ppl_increase_pct']:+.1f}%",
            f"{kl['mean']:.4f}" if kl else "—",
            f"{kl['p99']:.3f}" if kl else "—",
            f"{kl['top1_agreement'] * 100:.1f}%" if kl else "—",
            f"{sum(s['ok'] for s in smoke)}/{len(smoke)}" if smoke else "—",
            f"{sum(bool(s['correct']) for s in smoke)}/{len(smoke)}" if smoke else "—",
            f"{m['prefill_tps']:.0f}",
            f"{sum(dec) / len(dec):.1f}" if dec else "—",
            f"{sum(ttft) / len(ttft):.2f}" if ttft else "—",
            f"{m['load_s']:.1f}",
        ])
    return out


def task_names(report: dict) -> list[str]:
    """The tasks of a report (``qtk verify --tasks``), in the reference's order; [] without tasks."""
    return list((report["models"][0].get("tasks") or {}) if report.get("models") else [])


def _pct(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.1f}%"  # None, NaN: not measured


def _acc(t: dict | None) -> str:
    if not t or t.get("value") is None:
        return "—"
    v, se = t["value"], t.get("stderr")
    scale = 100.0 if t.get("metric", "").split(",")[0] in ("acc", "acc_norm", "exact_match") else 1.0
    return f"{v * scale:.1f}" + (f" ± {se * scale:.1f}" if se is not None else "")


def task_columns(report: dict) -> list[str]:
    names = task_names(report)
    cols = ["model", "format", "ppl"]
    for n in names:
        metric = (report["models"][0]["tasks"][n].get("metric") or "?")
        cols += [f"{n} {metric}", f"{n} recovery"]
    if len(names) > 1:
        cols.append("recovery (mean)")
    return cols + ["docs/s"]


def task_rows(report: dict) -> list[list[str]]:
    """One row per model: perplexity beside each task's accuracy (percent ± stderr) and recovery."""
    out = []
    for m in report["models"]:
        tasks, rec = m.get("tasks") or {}, m.get("recovery") or {}
        row = [short_name(m["name"]) + (" (ref)" if m["role"] == "reference" else ""), m["format"],
               f"{m['perplexity']['ppl']:.3f}"]
        for n in task_names(report):
            row += [_acc(tasks.get(n)), "ref" if m["role"] == "reference" else _pct((rec.get("tasks") or {}).get(n))]
        if len(task_names(report)) > 1:
            row.append("ref" if m["role"] == "reference" else _pct(rec.get("overall")))
        rates = [t["docs_per_s"] for t in tasks.values() if t.get("docs_per_s")]
        out.append(row + [f"{sum(rates) / len(rates):.1f}" if rates else "—"])
    return out


def _task_table(report: dict) -> Table:
    proto = (report.get("protocol") or {}).get("tasks") or {}
    limit = proto.get("limit")
    t = Table(title=f"task accuracy (lm-eval {proto.get('lm_eval', '?')}, "
                    f"{'first ' + str(limit) if limit else 'all'} documents per task, %, ± stderr; "
                    "recovery = candidate / reference)")
    for c in task_columns(report):
        t.add_column(c, justify="left" if c in ("model", "format") else "right")
    for r, m in zip(task_rows(report), report["models"]):
        t.add_row(*r, style="red" if m.get("gate_failures") else None)
    return t


def table(report: dict) -> Table | Group:
    """The report's table; with tasks, a second one: accuracy beside perplexity, per task per model."""
    main = _main_table(report)
    return Group(main, _task_table(report)) if task_names(report) else main


def _main_table(report: dict) -> Table:
    t = Table(title=f"qtk verify — text {report['protocol']['text']} (ctx {report['protocol']['ctx']}, "
                    f"second half scored), device {report['hardware']['device']}")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "format") else "right")
    for r, m in zip(rows(report), report["models"]):
        style = "red" if m.get("gate_failures") else None
        t.add_row(*r, style=style)
    return t


def markdown(report: dict) -> str:
    lines = [
        "# qtk verify report",
        "",
        f"Text: `{report['protocol']['text']}` (sha256 `{report['protocol']['text_sha256'][:16]}…`), "
        f"windows of {report['protocol']['ctx']} tokens, second half scored; KL on the reference's tokens. "
        f"Device: {report['hardware']['device']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    lines += _task_markdown(report)
    notes = []
    for m in report["models"]:
        if m.get("tokenization_match") is not None and m["tokenization_match"] < 1.0:
            notes.append(f"- {m['name']} tokenizes the text differently from the reference (identical for the first "
                         f"{m['tokenization_match'] * 100:.1f}% of the reference's tokens; {m['tokens_in_text']} vs "
                         f"{report['models'][0]['tokens_in_text']} tokens): its perplexity uses its own tokens; KL and "
                         "top-1 use the reference's.")
        for g in m.get("gate_failures") or []:
            notes.append(f"- **gate failed** for {m['name']}: {g}")
    if notes:
        lines += ["", *notes]
    if any(m.get("smoke") for m in report["models"]):
        lines += ["", "## Smoke answers", ""]
        names = [s["name"] for s in report["models"][0]["smoke"]]
        lines += ["| prompt | " + " | ".join(short_name(m["name"]) for m in report["models"]) + " |",
                  "|---|" + "---|" * len(report["models"])]
        for i, name in enumerate(names):
            cells = []
            for m in report["models"]:
                s = m["smoke"][i]
                flag = "" if s["ok"] else " ⚠"
                cells.append((s["answer"][:80].replace("|", "\\|").replace("\n", " ") or "(empty)") + flag)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _task_markdown(report: dict) -> list[str]:
    if not task_names(report):
        return []
    proto = report["protocol"].get("tasks") or {}
    cols = task_columns(report)
    lines = ["", "## Task accuracy", "",
             f"lm-eval {proto.get('lm_eval', '?')}; "
             f"{'the first ' + str(proto['limit']) if proto.get('limit') else 'all'} documents of each task, "
             f"seed {proto.get('seed')}, few-shot {proto.get('num_fewshot') if proto.get('num_fewshot') is not None else 'per task'}"
             "; accuracy in % ± stderr; recovery = candidate / reference accuracy (overall: the mean over tasks). "
             "Tasks: " + ", ".join(f"`{t['name']}` ({t['source']}" + (f", sha256 `{t['sha256'][:12]}…`" if t.get("sha256")
                                                                     else "") + ")" for t in proto.get("tasks", [])) + ".",
             "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in task_rows(report)]


def _plot_tasks(ax, report: dict, names: list[str], tags: list[str], colors: list) -> None:
    """Accuracy per task (grouped bars, ± stderr), each candidate's bar tagged with its recovery."""
    ms = report["models"]
    width = 0.8 / len(ms)
    for i, (tag, color, m) in enumerate(zip(tags, colors, ms)):
        for j, n in enumerate(names):
            t = (m.get("tasks") or {}).get(n) or {}
            if t.get("value") is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            se = t.get("stderr")
            ax.bar(x, t["value"] * 100, width, color=color, yerr=se * 100 if se is not None else None, capsize=2)
            rec = ((m.get("recovery") or {}).get("tasks") or {}).get(n)
            if rec is not None:  # above the error bar
                ax.annotate(f"{rec:.0f}%", (x, (t["value"] + (se or 0)) * 100), textcoords="offset points",
                            xytext=(0, 3), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_ylim(0, 125)
    ax.set_ylabel("accuracy % (± stderr)")
    ax.set_title("task accuracy (bar labels: recovery)")
    ax.grid(axis="y", alpha=0.3)


def _ellipsize(text: str, width: int = 72) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width - width // 2):]


def plot(report: dict, path: Path):
    """Quality vs size, and decode speed. Points and bars carry short tags (M1, M2...); one legend
    under the plots names each model in full, so long names neither overlap nor get cut."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = report["models"]
    tags = [f"M{i + 1}" for i in range(len(ms))]
    colors = [plt.cm.tab10.colors[i % 10] for i in range(len(ms))]
    ncol = 1 if len(ms) <= 3 else 2
    legend_rows = math.ceil(len(ms) / ncol)
    names = task_names(report)
    fig, axes = plt.subplots(1, 3 if names else 2, figsize=(16.5 if names else 11, 4.2 + 0.22 * legend_rows))
    a, b = axes[0], axes[1]
    for tag, color, m in zip(tags, colors, ms):
        x, y = m["size_bytes"] / 1e6, m["perplexity"]["ppl"]
        role = ", reference" if m["role"] == "reference" else ""
        a.errorbar(x, y, yerr=m["perplexity"]["stderr"], fmt="o", capsize=3, color=color,
                   label=f"{tag}  {_ellipsize(short_name(m['name']))} ({m['format']}{role})")
        a.annotate(tag, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    a.set_xlabel("size on disk (MB)")
    a.set_ylabel(f"perplexity (ctx {report['protocol']['ctx']}, lower is better)")
    a.set_title("quality vs size")
    a.grid(alpha=0.3)
    dec = []
    for m in ms:
        v = [s["decode_tps"] for s in m.get("smoke") or [] if s["decode_tps"]]
        dec.append(sum(v) / len(v) if v else 0.0)
    b.bar(range(len(ms)), dec, color=colors)
    b.set_xticks(range(len(ms)), [f"{tag}\n{m['format']}" for tag, m in zip(tags, ms)], fontsize=9)
    b.set_ylabel("decode tokens/s")
    b.set_title(f"decode speed ({report['hardware']['device']})")
    b.grid(axis="y", alpha=0.3)
    if names:
        _plot_tasks(axes[2], report, names, tags, colors)
    legend = fig.legend(loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    bottom = (0.3 + 0.22 * legend_rows) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return legend
