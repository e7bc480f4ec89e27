"""A suite's results from MLflow alone: one row per cell, mean ± std over seeds, the paired difference
to the baseline row (per seed, then mean ± std) and how many seeds agree with its sign; as markdown
(``docs/RESULTS.md``), a terminal table (``mpe compare --suite``) and a plot."""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from mpe.records import flat_name, from_mlflow, short_name
from mpe.tracking.runs import check_store
from mpe.tracking.settings import TrackingSettings

# the sections of a run's metrics a suite's report reads (mpe.records.SECTIONS)
REPORTED = ("trained", "analysis", "val", "reweight")


@dataclass
class CellResult:
    cell: str
    by_seed: dict[int, dict[str, float]]  # seed -> metric -> value

    def values(self, metric: str) -> dict[int, float]:
        return {s: m[metric] for s, m in self.by_seed.items() if metric in m}


def collect(settings: TrackingSettings, suite: str, form: str) -> dict[str, CellResult]:
    """The finished runs of ``suite``/``form`` in the tracking store, by cell and seed (latest run wins)."""
    import mlflow

    check_store(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is None:
        return {}
    runs = mlflow.search_runs(
        [exp.experiment_id],
        output_format="list",
        order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`mpe.suite` = '{suite}' and tags.`mpe.form` = '{form}'",
    )
    cells: dict[str, CellResult] = {}
    for r in runs:
        cell, seed = r.data.tags.get("mpe.cell"), r.data.tags.get("mpe.seed")
        sections = from_mlflow(r.data.metrics)
        if cell is None or seed is None or "text_to_image_R@1" not in sections.get("trained", {}):
            continue  # not evaluated (yet)
        metrics = {
            flat_name(section, name): v
            for section, values in sections.items()
            if section in REPORTED
            for name, v in values.items()
        }
        cells.setdefault(cell, CellResult(cell, {})).by_seed[int(seed)] = metrics
    return cells


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (math.nan, math.nan)


def table_rows(cells: dict[str, CellResult], order: list[str], baseline: str, metrics: list[str]) -> list[dict]:
    """Per cell and metric: mean, std, n, and against the baseline the paired mean difference, its std and
    how many seeds agree in sign."""
    base = cells.get(baseline)
    rows = []
    for cell in [c for c in order if c in cells]:
        row = {"cell": cell, "seeds": len(cells[cell].by_seed)}
        for m in metrics:
            vals = cells[cell].values(m)
            mean, std = _mean_std(list(vals.values()))
            entry = {"mean": mean, "std": std, "n": len(vals)}
            if base is not None and cell != baseline:
                b = base.values(m)
                diffs = [vals[s] - b[s] for s in vals if s in b]
                if diffs:
                    d_mean, d_std = _mean_std(diffs)
                    sign = 1 if d_mean > 0 else -1 if d_mean < 0 else 0
                    entry.update(
                        diff=d_mean,
                        diff_std=d_std,
                        agree=sum(1 for d in diffs if sign and d * sign > 0),
                        paired=len(diffs),
                    )
            row[m] = entry
        rows.append(row)
    return rows


def comparison_rows(cells: dict[str, CellResult], pairs: list[tuple[str, str]], metrics: list[str]) -> list[dict]:
    """Per pair (a, b) and metric: the per-seed differences a - b (seeds both have), their mean ± std and how many
    seeds agree with the mean's sign."""
    rows = []
    for a, b in pairs:
        if a not in cells or b not in cells:
            continue
        row = {"cell": f"{a} − {b}", "seeds": len(set(cells[a].by_seed) & set(cells[b].by_seed))}
        for m in metrics:
            va, vb = cells[a].values(m), cells[b].values(m)
            diffs = [va[s] - vb[s] for s in va if s in vb]
            if not diffs:
                row[m] = {"n": 0}
                continue
            mean, std = _mean_std(diffs)
            sign = 1 if mean > 0 else -1 if mean < 0 else 0
            row[m] = {
                "mean": mean,
                "std": std,
                "n": len(diffs),
                "agree": sum(1 for d in diffs if sign and d * sign > 0),
            }
        rows.append(row)
    return rows


def _diff_text(e: dict) -> str:
    if not e or e["n"] == 0:
        return "–"
    return f"{e['mean']:+.3f} ± {e['std']:.3f} ({e['agree']}/{e['n']})"


def comparison_markdown(rows: list[dict], metrics: list[str]) -> str:
    head = "| a − b | seeds | " + " | ".join(short_name(m) for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['seeds']} | " + " | ".join(_diff_text(r.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(e: dict) -> str:
    if not e or e["n"] == 0:
        return "–"
    out = f"{e['mean']:.3f} ± {e['std']:.3f}"
    if "diff" in e:
        out += f" ({e['diff']:+.3f} ± {e['diff_std']:.3f}, {e['agree']}/{e['paired']})"
    return out


def markdown(rows: list[dict], metrics: list[str]) -> str:
    head = "| cell | seeds | " + " | ".join(short_name(m) for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['seeds']} | " + " | ".join(_cell_text(r.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def terminal(rows: list[dict], metrics: list[str]) -> str:
    width = max([len(r["cell"]) for r in rows] + [4])
    out = [f"{'cell':{width}s} " + " ".join(f"{short_name(m)[:22]:>22s}" for m in metrics)]
    for r in rows:
        cells = []
        for m in metrics:
            e = r.get(m) or {}
            txt = "–" if not e.get("n") else f"{e['mean']:.3f}±{e['std']:.3f}"
            if "diff" in e:
                txt += f" {e['diff']:+.3f}"
            cells.append(f"{txt:>22s}")
        out.append(f"{r['cell']:{width}s} " + " ".join(cells))
    return "\n".join(out) + "\n"


def plot(rows: list[dict], metrics: list[str], target: Path, title: str) -> Path:
    """Grouped bars (one group per cell) with the seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mpe.files.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 3.8))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        means = [r[m]["mean"] if r.get(m) else 0 for r in rows]
        stds = [r[m]["std"] if r.get(m) else 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], means, width, yerr=stds, capsize=2, label=short_name(m))
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["cell"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def _prompt_matrix(res: CellResult) -> list[str]:
    """What each prompt's segment alone tells apart, per aspect (rows) and prompt (columns), mean over seeds,
    with the whole embedding beside it and the spread between the best and the worst prompt: a prompt that
    specialises is far above the others on its aspect."""
    keys = {k for m in res.by_seed.values() for k in m}
    rows: dict[str, dict[str, str]] = {}
    for k in sorted(keys):
        if not k.startswith("analysis."):
            continue
        name = k[len("analysis.") :]
        if name.startswith("aspect_"):
            stem, _, who = name[len("aspect_") :].rpartition("_")
            if who == "full":
                rows.setdefault(f"aspect {stem}", {})["full"] = k
            elif stem.endswith("_prompt"):
                rows.setdefault(f"aspect {stem[: -len('_prompt')]}", {})[f"prompt_{who}"] = k
        elif "_prompt_" in name and "." in name:  # <benchmark>.<category>_prompt_<i>
            stem, _, i = name.rpartition("_prompt_")
            rows.setdefault(stem, {})[f"prompt_{i}"] = k
    prompts = sorted({w for r in rows.values() for w in r if w.startswith("prompt_")}, key=lambda w: int(w[7:]))
    if len(prompts) < 2:
        return []
    lines = [
        "| aspect / category | full | " + " | ".join(p.replace("_", " ") for p in prompts) + " | best − worst prompt |",
        "|" + "---|" * (len(prompts) + 3),
    ]
    for name, who in rows.items():
        if not all(p in who for p in prompts):
            continue
        means = {p: _mean_std(list(res.values(who[p]).values()))[0] for p in prompts}
        full = (
            f"{_mean_std(list(res.values(who['full']).values()))[0]:.3f}"
            if "full" in who
            else f"{_mean_std(list(res.values(name).values()))[0]:.3f}"
            if res.values(name)
            else "–"
        )
        spread = max(means.values()) - min(means.values())
        cells_txt = " | ".join(f"{means[p]:.3f}" for p in prompts)
        lines.append(f"| {name} | {full} | {cells_txt} | {spread:.3f} |")
    return lines


def _analysis_rows(cells: dict[str, CellResult], names: list[str]) -> list[str]:
    """Per-prompt numbers of the analysed cells, averaged over seeds."""
    lines = []
    for cell in names:
        if cell not in cells:
            continue
        res = cells[cell]
        keys = sorted({k for m in res.by_seed.values() for k in m if k.startswith(("analysis.", "reweight."))})
        if not keys:
            continue
        lines += [f"\n**{cell}** (mean over {len(res.by_seed)} seeds)\n"]
        matrix = _prompt_matrix(res)
        if matrix:
            lines += ["What each prompt's segment alone tells apart:", "", *matrix, ""]
        lines += ["| quantity | value |", "|---|---|"]
        for k in keys:
            mean, std = _mean_std(list(res.values(k).values()))
            lines.append(f"| {k} | {mean:.3f} ± {std:.3f} |")
    return lines


def results_markdown(
    suite, form: str, cells: dict[str, CellResult], command: str, commit: str, plot_name: str | None
) -> str:
    """The whole ``docs/RESULTS.md``: header, the main table, the analysed cells, how to read it."""
    import datetime as dt

    rows = table_rows(cells, list(suite.cells), suite.baseline, suite.metrics)
    seeds = ", ".join(map(str, suite.seeds))
    out = [
        f"# Results: suite `{suite.name}`, form `{form}`",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}, commit `{commit}`, machine: {machine()}.",
        f"Seeds {seeds}; every cell trains with the same steps and batch. Entries are mean ± std over seeds; in "
        f"parentheses the paired difference to `{suite.baseline}` (per seed, then mean ± std) and how many seeds "
        "agree with its sign. Test split unless the column says `val`.",
        "",
        suite.description.strip(),
        "",
        markdown(rows, suite.metrics),
    ]
    for title, metrics in suite.tables.items():
        out += [f"### {title}", "", markdown(table_rows(cells, list(suite.cells), suite.baseline, metrics), metrics)]
    if suite.comparisons:
        shown = list(dict.fromkeys([*suite.metrics, *(m for ms in suite.tables.values() for m in ms)]))
        out += [
            "### Paired differences",
            "",
            "Per seed the difference a − b, then mean ± std over seeds, and in parentheses how many seeds agree "
            "with the mean's sign.",
            "",
            comparison_markdown(comparison_rows(cells, list(suite.comparisons), shown), shown),
        ]
    if plot_name:
        out += [f"![results]({plot_name})", ""]
    if suite.analyse:
        out += [
            "## What the prompts learned",
            "",
            "`analysis.prompt_i_text_to_image_R@1`: retrieval with prompt i's segment alone; "
            "`analysis.aspect_<a>_<who>`: how often an image scores its caption above the caption with aspect "
            "<a> changed, with the full embedding or one prompt's segment; `analysis.inter_prompt_cosine`: mean "
            "cosine between the K projected pieces; `analysis.caption_over_negated_accuracy`: how often an "
            "image prefers its caption's embedding to the caption's negated embedding; `reweight.*`: weights "
            "chosen on val and the test gain over equal weights.",
        ]
        out += _analysis_rows(cells, suite.analyse)
    return "\n".join(out) + "\n"


def suite_cells(name: str, form: str, project: Path = Path(".")):
    """The suite and its finished cells from MLflow (the store of the suite's base params, resolved as every
    command resolves it); a named error when none has finished."""
    from mpe.config import load_params
    from mpe.errors import ConfigError
    from mpe.evaluation.experiments.suite import load_suite, suite_path
    from mpe.tracking.settings import resolve_tracking_uri, tracking_settings

    suite = load_suite(suite_path(name, project))
    settings = tracking_settings(resolve_tracking_uri(load_params(Path(project) / suite.base)).mlflow)
    cells = collect(settings, suite.name, form)
    if not cells:
        raise ConfigError(
            f"no finished runs of suite '{suite.name}' (form {form}) in MLflow yet: "
            f"`mpe experiments run {suite.name} --form {form}` first"
        )
    return suite, settings, cells


def suite_table(name: str, form: str, project: Path = Path(".")) -> str:
    """The terminal table of a suite's cells (``mpe compare --suite``)."""
    suite, _, cells = suite_cells(name, form, project)
    return terminal(table_rows(cells, list(suite.cells), suite.baseline, suite.metrics), suite.metrics)


def write_suite_report(name: str, form: str, out: Path, project: Path = Path(".")) -> tuple[Path, Path, int, str]:
    """Write the suite's markdown report and plot, and log both to the suite's parent MLflow run; returns
    (markdown, plot, cells, parent run id)."""
    from mpe.files.atomic import write_text
    from mpe.provenance.lineage import git_commit
    from mpe.tracking.runs import log_to_run, parent_run

    suite, settings, cells = suite_cells(name, form, project)
    png = out.with_name(f"results_{suite.name}_{form}.png")
    rows = table_rows(cells, list(suite.cells), suite.baseline, suite.metrics)
    plot(
        rows if not suite.plot else table_rows(cells, list(suite.cells), suite.baseline, suite.plot),
        suite.plot or [m for m in suite.metrics if "R@5" in m][:4] or suite.metrics[:2],
        png,
        f"{suite.name} ({form}): mean ± std over seeds",
    )
    command = f"mpe experiments report {suite.name} --form {form}"
    write_text(out, results_markdown(suite, form, cells, command, git_commit(Path(project))[:7] or "unknown", png.name))
    parent = parent_run(
        settings, f"{suite.name} ({form})", {"mpe.suite": suite.name, "mpe.form": form, "mpe.suite_parent": "true"}
    )
    log_to_run(settings, parent, artifacts=[out, png], artifact_path="report")
    return out, png, len(cells), parent
