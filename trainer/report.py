"""`trainer report RUN_DIR`: training curves as PNGs and a markdown summary of a run.

Reads what a run leaves behind and never the training code: `log.jsonl` (one record per
logging step; validation records carry `val_` keys), `config.yaml` (the resolved config) and
the evaluation records in `RUN_DIR/eval/*.json` (trainer/eval/results.py). Writes
`RUN_DIR/report/report.md` with one PNG per logged quantity beside it: every loss (with its
validation counterpart on the same axes), the learning rate, throughput, the share of time spent
waiting for data and peak memory; any other numeric key gets its own plot too. The summary sets
each evaluation beside chance and, when it was measured with the thesis's protocol, beside the
thesis's published figure (the registry in trainer/eval/results.py says which).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from trainer.errors import UserError

# bookkeeping, not curves: elapsed and ETA are wall-clock, val_batches/val_s the size and cost of a validation
_NOT_PLOTTED = {"step", "total_steps", "epoch", "elapsed_s", "eta_s", "val_batches", "val_s", "best"}
# title, y label, scale applied to the values
_KNOWN = {
    "lr": ("learning rate", "lr", 1.0),
    "samples_per_s": ("throughput", "samples / s", 1.0),
    "data_wait": ("data-wait share", "% of step time waiting for data", 100.0),
    "peak_mem_bytes": ("peak memory", "GiB", 1 / 2**30),
}


def read_log(run_dir: Path) -> list[dict]:
    """The records of log.jsonl. A last line cut off (a crash or a full disk while writing) is
    skipped with a note; a bad line anywhere else is an error."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no log.jsonl: is it a run directory of `trainer train`?")
    records = []
    lines = path.read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == last:
                click.echo(f"note: {path}:{n}: the last line is cut off (the run was killed or the disk was "
                           f"full while writing it); skipped", err=True)
                continue
            raise UserError(f"{path}:{n}: not a JSON line") from None
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for every finite numeric key; a resumed run's repeated steps keep
    the latest record."""
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        for k, v in rec.items():
            if k in _NOT_PLOTTED or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            by_key.setdefault(k, {})[int(rec["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_key.items()}


def panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(name, keys drawn together): each quantity with its `val_` twin, losses first, then the
    known quantities, then the rest in log order; a `val_` key without a training twin alone."""
    out, used = [], set()

    def add(k: str) -> None:
        if k in used:
            return
        group = [k] + ([f"val_{k}"] if not k.startswith("val_") and f"val_{k}" in keys else [])
        out.append((k, group))
        used.update(group)

    for k in keys:
        if "loss" in k and not k.startswith("val_"):
            add(k)
    for k in [*_KNOWN, *keys]:
        if k in keys and not k.startswith("val_"):
            add(k)
    for k in keys:
        add(k)
    return out


def plot_panels(data: dict, out_dir: Path) -> list[tuple[str, str]]:
    """One PNG per panel; returns (title, file name)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    written = []
    for name, keys in panels(list(data)):
        title, ylabel, scale = _KNOWN.get(name, (name.replace("_", " "), name, 1.0))
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        values = []
        for k in keys:
            steps, vals = data[k]
            vals = [v * scale for v in vals]
            values += vals
            val = k.startswith("val_")
            ax.plot(steps, vals, marker="o" if val or len(steps) < 30 else None, ms=3,
                    ls="--" if val else "-", label=("validation " if val else "train ") + k.removeprefix("val_"))
        if "loss" in name and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or "loss" in name:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fname = f"{name}.png"
        fig.savefig(out_dir / fname)
        plt.close(fig)
        written.append((title, fname))
    return written


# -- the evaluation table ----------------------------------------------------------------------
# Everything benchmark-specific (which metrics, which protocol, which thesis figures) comes from the
# registry in trainer/eval/results.py: this code has no branch per benchmark.

def _model_name(rec: dict) -> str:
    label = (rec.get("options") or {}).get("label")
    model = rec.get("model", {})
    name = label or (f"student ({model.get('task')})" if model.get("kind") == "student" else model.get("kind", "?"))
    if model.get("step") is not None:
        name += f", step {model['step']}"
    return name


def _data_of(rec: dict) -> dict:
    sets = rec.get("data") or {}
    return sets.get("validation") or sets.get("test") or next(iter(sets.values()), {})


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def _protocols(recs: list[dict]) -> str:
    return ", ".join(sorted({r.get("protocol") or "not recorded" for r in recs}))


def _thesis_row(entry: dict, label: str, keys: list[str]) -> str:
    return f"| *thesis: {entry['model']}* ({entry['setting']}) | {label}" + " | ".join(
        _fmt(entry["metrics"].get(k)) for k in keys) + " |"


def _dataset_table(ev, dataset: str, split: str, recs: list[dict]) -> list[str]:
    """One benchmark on one data set: a row per evaluated model, chance, and the thesis's figure
    when a model was measured with the thesis's protocol."""
    from trainer.eval.results import metric_value, thesis_figure

    keys, labels = [k for k, _ in ev.metrics], [lbl for _, lbl in ev.metrics]
    # students first, then the teachers they are compared with
    recs = sorted(recs, key=lambda r: (r.get("model", {}).get("kind") != "student", _model_name(r)))
    lines = [f"**{ev.title}**, {dataset} {split}", "", "| model | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(keys)]
    for rec in recs:
        lines.append(f"| {_model_name(rec)} | " + " | ".join(_fmt(metric_value(rec, k)) for k in keys) + " |")
    chance = [(metric_value(recs[0], "chance") or {}).get(k) for k in keys]  # keyed by the metric's dotted key
    if any(c is not None for c in chance):
        lines.append("| *chance* | " + " | ".join(_fmt(c) for c in chance) + " |")
    pub = next((p for r in recs if (p := thesis_figure(ev.name, dataset, split, r.get("protocol")))), None)
    if pub:
        lines.append(_thesis_row(pub, "", keys))
    lines += ["", f"Protocol: {_protocols(recs)}" + ("" if pub or not ev.thesis else
              f" (the thesis's figures were measured with `{ev.protocol}`: not set beside these)."), ""]
    return lines


def _combined_table(ev, recs: list[dict]) -> list[str]:
    """An evaluation whose figure combines several data sets (the GLUE score): a row per data set
    and model, then the mean over the members present, beside the thesis's when the protocol and
    the set of members match."""
    from trainer.eval.results import metric_value, thesis_figure

    comb, lines = ev.combined, []
    lines += [f"**{ev.title}**", "", "| model | data set | " + " | ".join(lbl for _, lbl in ev.metrics)
              + " | thesis |", "|---|---|" + "---:|" * (len(ev.metrics) + 1)]
    by_model: dict[str, dict[str, dict]] = {}
    for rec in sorted(recs, key=lambda r: (_model_name(r), r.get("dataset", ""))):
        by_model.setdefault(_model_name(rec), {})[rec.get("dataset", "")] = rec
        pub = thesis_figure(ev.name, rec.get("dataset", ""), None, rec.get("protocol"))
        figure = _fmt(pub["metrics"].get(comb.metric)) if pub else ""
        lines.append(f"| {_model_name(rec)} | {rec.get('dataset', '')} | " + " | ".join(
            _fmt(metric_value(rec, k)) for k, _ in ev.metrics) + f" | {figure} |")
    thesis = None
    for model, per in by_model.items():
        present = [d for d in comb.members if d in per]
        vals = [metric_value(per[d], comb.metric) for d in present]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            lines.append(f"| {model} | *{comb.label}: {len(vals)} of {len(comb.members)}* | "
                         f"{sum(vals) / len(vals):.2f} | |")
        complete = len(vals) == len(comb.members)
        if complete and all(thesis_figure(ev.name, d, None, per[d].get("protocol")) for d in present):
            thesis = ev.thesis.get(ev.name)
    if thesis:
        figure = _fmt(thesis["metrics"][comb.metric])
        lines.append(f"| *thesis: {thesis['model']}* | {thesis['setting']} | | {figure} |")
    lines += ["", f"Protocol: {_protocols(recs)}" + ("" if thesis else
              f" (the thesis's {comb.label.split(' (')[0]} needs all {len(comb.members)} members measured "
              f"with `{ev.protocol}`)."), ""]
    return lines


def eval_table(records: list[dict]) -> list[str]:
    """One table per benchmark and data (or one per combined benchmark), in registry order."""
    from trainer.eval.results import EVALUATIONS

    lines: list[str] = []
    for ev in EVALUATIONS.values():
        mine = [r for r in records if r.get("benchmark") == ev.name]
        if not mine:
            continue
        if ev.combined:
            lines += _combined_table(ev, mine)
            continue
        groups: dict[tuple, list[dict]] = {}
        for rec in mine:
            d = _data_of(rec)
            groups.setdefault((rec.get("dataset", ""), d.get("split", ""), d.get("sha256", "")), []).append(rec)
        # held-out splits first: a figure on training data is a sanity check, not the benchmark
        for key in sorted(groups, key=lambda g: (g[0], g[1] not in ("validation", "test"), g[1])):
            lines += _dataset_table(ev, key[0], key[1], groups[key])
    unknown = sorted({r.get("benchmark", "?") for r in records} - set(EVALUATIONS))
    if unknown:
        lines += [f"(records of unknown evaluations not shown: {', '.join(unknown)})", ""]
    return lines


def _teacher_comparison(records: list[dict]) -> list[str]:
    """A sentence per student record that has a teacher's record of the same evaluation on the
    same data beside it, for the evaluations whose registry entry names `compare` keys."""
    from trainer.eval.results import EVALUATIONS, metric_value

    out = []
    for ev in (e for e in EVALUATIONS.values() if e.compare):
        mine = [r for r in records if r.get("benchmark") == ev.name]
        teachers = [r for r in mine if r.get("model", {}).get("kind") != "student"]
        labels = dict(ev.metrics)
        for s in (r for r in mine if r.get("model", {}).get("kind") == "student"):
            for t in (t for t in teachers if _data_of(t).get("sha256") == _data_of(s).get("sha256")):
                (first, *rest), a, b = ev.compare, metric_value(s, ev.compare[0]), metric_value(t, ev.compare[0])
                ratio = 100 * a / b if b else float("nan")
                parts = [f"{ev.short} {labels[first]}: student {a:.2f} vs {_model_name(t)} {b:.2f} "
                         f"({ratio:.0f}% of it)"]
                parts += [f"{labels[k]}: {metric_value(s, k):.2f} vs {metric_value(t, k):.2f}" for k in rest]
                out.append("- " + "; ".join(parts) + ".")
    return out


# -- the report ----------------------------------------------------------------------------------

def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 eval_dirs: tuple[str, ...] = ()) -> Path:
    """Plots and report.md for RUN_DIR; returns the markdown's path."""
    from trainer.eval.results import read_results

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    records = read_log(run)
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = series(records)
    plots = plot_panels(data, out) if data else []
    dirs = [d for d in (run / "eval", *map(Path, eval_dirs)) if d.is_dir()]
    evals = [r for d in dirs for r in read_results(d)]

    last = records[-1] if records else {}
    md = [f"# Run report: `{run.name}`", ""]
    cfg_path = run / "config.yaml"
    cfg_text = cfg_path.read_text() if cfg_path.is_file() else ""
    task = next((ln.split(":", 1)[1].strip() for ln in cfg_text.splitlines() if ln.startswith("task:")), "?")
    md.append(f"Task `{task}`, {last.get('step', 0)} of {last.get('total_steps', '?')} steps logged in "
              f"`{run / 'log.jsonl'}`.")
    finals = [f"{k} {v[1][-1]:.4g}" for k, v in data.items() if "loss" in k]
    if finals:
        md.append(f"Last logged: {', '.join(finals)}.")
    md += ["", "## Evaluation", ""]
    if evals:
        md += _teacher_comparison(evals)
        md += ["", *eval_table(evals),
               "Chance: top-k = k / classes present (zero-shot: k / classes named); R@k: a random ranking. Thesis: the "
               "published figure for the same benchmark, shown only beside a result measured with the same protocol "
               "(full datasets, full training; see docs/evaluation.md)."]
    else:
        md.append(f"No evaluation records in `{run / 'eval'}` (run `trainer eval ... {run}`).")
    md += ["", "## Training curves", ""]
    md += [f"![{title}]({fname})" for title, fname in plots] or ["(nothing logged yet)"]
    if cfg_text:
        md += ["", "## Config", "", "```yaml", cfg_text.rstrip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="[default: RUN_DIR/report]")
@click.option("--eval-dir", multiple=True, type=click.Path(file_okay=False),
              help="more directories of evaluation JSONs (RUN_DIR/eval is always read)")
def report_command(run_dir: str, out: str | None, eval_dir: tuple[str, ...]) -> None:
    """Plot RUN_DIR's training curves and write a markdown summary with its evaluations."""
    path = write_report(run_dir, out, eval_dir)
    click.echo(f"wrote {path}")
