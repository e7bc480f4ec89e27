"""The ``mpe`` command line: one sub-command per stage (each calls ``mpe.stages.<stage>.run``), the whole
flow, and the model utilities. It parses, loads the params, and calls one library function per command;
errors a user can act on print one line and exit 2.

Every command that reads params takes ``--params FILE`` and ``--set key.path=value`` (repeatable, typed
and validated like the file) before or after its name, and resolves where MLflow tracks in one place
(``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then params: ``mpe.tracking.settings``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from mpe import __version__
from mpe.errors import ConfigError, Interrupted

DEFAULT_PARAMS = "params.yaml"
SERVING_COMMANDS = ("serve", "ui", "schedule")  # they run until Ctrl-C


def _params(args, required: bool = True):
    """The params of this command: the file (``--params``, default ``params.yaml``) with ``--set`` applied and
    the tracking URI resolved; the built-in defaults where a command allows it and no file exists. Ray is
    told to stay on loopback before anything imports it."""
    from mpe.config import Params, apply_overrides, validate
    from mpe.runtime.ray_cluster import prefer_loopback
    from mpe.tracking.settings import resolve_tracking_uri

    path = Path(args.params or DEFAULT_PARAMS)
    if not path.exists() and not args.params and not required:
        params = (
            validate(Params, apply_overrides({}, args.set), f"defaults (with --set {' '.join(args.set)})")
            if args.set
            else Params()
        )
    elif not path.exists():
        where = "" if args.params else f" in {Path.cwd()} (run from the project directory, or pass --params)"
        raise ConfigError(f"{path}: params file not found{where}")
    else:
        from mpe.config import load_params

        params = load_params(path, args.set)
    prefer_loopback(params.ray)
    return resolve_tracking_uri(params)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def cmd_model_init(args) -> None:
    params = _params(args, required=False)
    from mpe.model.base_model import write_untrained

    print(write_untrained(params.model, params.base_model, args.out, base=args.base, num_prompts=args.num_prompts))


def cmd_embed(args) -> None:
    from mpe.serving.embed_files import embed_files

    print(
        embed_files(
            args.model,
            args.out,
            text_file=args.text_file,
            image_dir=args.image_dir,
            video_dir=args.video_dir,
            batch_size=args.batch_size,
        )
    )


def cmd_sources(args) -> None:
    params = _params(args)
    from mpe.stages import sources

    listing = sources.run(params)
    base = listing["base_model"].get("local_sha256")
    vision = listing["vision"]["sha256"]
    print(
        f"{listing['source']}: {len(listing['parts'])} URL list parts; base model "
        + (f"folder sha256 {base[:12]}" if base else listing["base_model"]["name"])
        + (f"; vision tower sha256 {vision[:12]}" if vision else "")
    )


def cmd_data(args) -> None:
    params = _params(args)
    from mpe.stages import data

    stats = data.run(params)
    for split, s in stats["splits"].items():
        print(f"{split}: {s['successes']}/{s['count']} images ({s['success_rate']:.1%})")
    for part, rep in stats.get("url_list_report", {}).items():
        if rep.get("repeated_url_rows"):
            print(
                f"{part}: {rep['repeated_url_rows']} of {rep['train'] + rep['test']} rows repeat a URL of an "
                f"earlier row ({rep['distinct_urls']} distinct URLs; first: {rep['repeated_urls'][0]}); each row "
                "is kept as a sample, and a URL's rows stay in one split (metrics/data.json url_list_report)"
            )


def cmd_base_model(args) -> None:
    params = _params(args)
    from mpe.stages import base_model

    out = base_model.run(params)
    print(f"wrote the base model with {out['apt_tokens']} APT tokens to {out['out_dir']}")


def cmd_cache(args) -> None:
    params = _params(args)
    from mpe.stages import cache

    _print_json(cache.run(params))


def cmd_train(args) -> None:
    params = _params(args)
    from mpe.stages import train

    _print_json(train.run(params))


def cmd_evaluate(args) -> None:
    params = _params(args)
    from mpe.stages import evaluate

    report = evaluate.run(params)
    _print_json({k: v for k, v in report.items() if k != "details"})


def cmd_register(args) -> None:
    params = _params(args)
    from mpe.stages import register

    _print_json(register.run(params, Path(".")))


def cmd_reweight(args) -> None:
    params = _params(args)
    from mpe.stages import reweight

    _print_json(reweight.run(params, args.model))


def cmd_compare(args) -> None:
    if args.suite:
        from mpe.evaluation.experiments.report import suite_table

        print(suite_table(args.suite, args.form), end="")
        return
    params = _params(args)
    from mpe.tracking.compare import write_comparison
    from mpe.tracking.settings import tracking_settings

    print(write_comparison(tracking_settings(params.mlflow), Path(args.out), args.last), end="")


def cmd_plan(args) -> None:
    params = _params(args, required=False)
    from mpe.planning.cluster import load_cluster
    from mpe.planning.plan import SUMMARY_HEADER, build_plans, render, summary_row
    from mpe.runtime.peak import measure_peak, read_peak

    clusters = [load_cluster(c) for c in args.cluster]
    peak = None
    if any(c.accelerator.peak_tflops == "measured" for c in clusters):
        from mpe.records import PEAK, metrics_file

        peak_file = Path(args.peak or metrics_file(params.metrics_dir, PEAK))
        peak = read_peak(peak_file) if peak_file.exists() else None
        if peak is None:
            print("measuring this machine's peak (mpe.runtime.peak) ...", file=sys.stderr, flush=True)
            peak = measure_peak(seconds=1.0)
        print(
            f"peak of this machine ({peak_file if peak_file.exists() else 'measured now'}): "
            + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peak.flops.items()),
            flush=True,
        )
    plans = build_plans(
        params,
        clusters,
        args.cache_dtype,
        samples=int(args.samples) if args.samples else None,
        caption_tokens=args.caption_tokens,
        image_bytes=args.image_bytes,
        model_config=args.model_config,
        measured_peak=peak.flops if peak else None,
    )
    for plan in plans:
        print(render(plan))
    if len(plans) > 1:
        print(SUMMARY_HEADER)
        print("\n".join(summary_row(p) for p in plans))
    if args.json:
        from mpe.files.atomic import write_json

        write_json(Path(args.json), [p.to_json() for p in plans])


def cmd_reproduce(args) -> None:
    if not args.version and not args.alias:
        raise ConfigError("mpe reproduce: name the version (--version N) or the alias (--alias champion)")
    params = _params(args, required=False)
    from mpe.provenance.reproduce import reproduce
    from mpe.tracking.settings import tracking_settings

    _print_json(
        reproduce(
            Path("."),
            tracking_settings(params.mlflow),
            args.model or params.registry.model_name,
            args.version,
            args.alias,
            args.only == "model",
        )
    )


def cmd_params_show(args) -> None:
    import yaml

    params = _params(args)
    print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False), end="")


def cmd_tracking_server(args) -> None:
    from mpe.tracking import server as tracking_server

    if args.action == "start":
        state = tracking_server.start(args.dir, args.port, args.os_user, args.workers)
        how = "already running" if state["already_running"] else "started"
        if state["repaired"]:
            how = f"restarted ({'; '.join(state['repaired'])})"
        print(
            f"MLflow tracking server {how}: {state['tracking_uri']} (PostgreSQL on 127.0.0.1:{state['pg_port']}, "
            f"pid {state['pid']}, logs and artifacts in {args.dir}/)\n"
            f"use it: mlflow.tracking_uri: {state['tracking_uri']} in params.yaml"
        )
    elif args.action == "stop":
        stopped = tracking_server.stop(args.dir)
        print("stopped " + ", ".join(stopped) if stopped else f"nothing was running in {args.dir}")
    else:
        state = tracking_server.status(args.dir)
        if state is None:
            print(f"not running ({args.dir})")
            raise SystemExit(3)
        _print_json(state)
        if not state["healthy"]:
            print(
                f"mpe tracking-server: unhealthy: {'; '.join(state['problems'])}; "
                f"`mpe tracking-server start --dir {args.dir}` restarts it, `stop` ends every process listed",
                file=sys.stderr,
            )
            raise SystemExit(1)


def cmd_serve(args) -> None:
    params = _params(args, required=False)
    from mpe.config import ServeConfig
    from mpe.model.configuration import validate
    from mpe.serving.server import serve

    overrides = {
        k: getattr(args, k)
        for k in ("host", "port", "max_body_mb", "max_rows", "max_caption_chars", "max_request_megapixels")
        if getattr(args, k) is not None
    }
    cfg = validate(ServeConfig, {**params.serve.model_dump(), **overrides}, "serve (params and options)")
    serve(
        args.model or f"models:/{params.registry.model_name}@champion",
        cfg,
        params.mlflow.tracking_uri,
        args.index,
        params.search,
        None if args.no_search else params.search.out_dir,
    )


def cmd_index(args) -> None:
    params = _params(args, required=False)
    from mpe.stages import search_index

    meta = search_index.run(params, args.model, args.out)
    print(
        f"{'built' if meta['built'] else 'kept'} the search index of {meta['count']} images "
        f"({meta['index_key']}, model {meta['model']['sha256'][:12]}) in {meta['out_dir']}"
    )


def cmd_ui(args) -> None:
    params = _params(args, required=False)
    from mpe.runtime.prefect_server import user_interfaces
    from mpe.tracking.settings import tracking_settings

    settings = tracking_settings(params.mlflow)
    _own_children()
    user_interfaces(settings.tracking_uri, settings.artifact_location, args.mlflow_port, args.prefect_port)


def cmd_experiments_run(args) -> None:
    from mpe.evaluation.experiments.suite import expand, load_suite, suite_path
    from mpe.runtime.prefect_server import load_flow, prefect_server
    from mpe.runtime.project_lock import project_lock
    from mpe.runtime.ray_cluster import prefer_loopback

    # the suite's own runs say where Ray runs; told before the flow's stages import Ray, as every other command
    # is through its params, a local cluster stays on 127.0.0.1
    for spec in expand(load_suite(suite_path(args.name)), args.form):
        prefer_loopback(spec.params.ray)
    _own_children()
    with project_lock(".", wait=0), prefect_server():
        experiment_suite = load_flow(".", "experiments.py:experiment_suite")
        print(experiment_suite(args.name, args.form, ".", args.only or None))


def cmd_experiments_report(args) -> None:
    from mpe.evaluation.experiments.report import write_suite_report

    out, png, n, parent = write_suite_report(args.name, args.form, Path(args.out))
    print(f"wrote {out} and {png} ({n} cells); logged to MLflow run {parent}")


def _project_params(args) -> Path:
    """``mpe run``/``schedule`` run the DVC stages, which read the project's ``params.yaml``: any other file
    would mix two configurations, so it is refused. Validated (``--set`` included) before anything runs."""
    path = Path(args.params or DEFAULT_PARAMS)
    project = Path.cwd() / DEFAULT_PARAMS
    if path.resolve() != project.resolve():
        raise ConfigError(
            f"{path}: `mpe {args.command}` runs the DVC pipeline, which reads {project}; copy your "
            f"file there (cp {path} {DEFAULT_PARAMS}) or run the stages one by one with --params"
        )
    _params(args)
    return path


def _write_overrides(args, path: Path) -> None:
    """``--set`` changes written into the project's params.yaml (as ``dvc exp run -S`` does), so the stages,
    DVC and the run's record all see them."""
    if args.set:
        from mpe.config import write_overrides

        for line in write_overrides(path, args.set):
            print(line, file=sys.stderr)


def _own_children() -> None:
    """What this command starts (Prefect's server, DVC, the stages and their Ray cluster) ends with it, even
    when it is killed; what an earlier, killed command left is stopped first (``mpe.runtime.lifeline``)."""
    from mpe.runtime.lifeline import own

    own(say=lambda m: print(m, file=sys.stderr))


def cmd_run(args) -> None:
    from mpe.runtime.prefect_server import load_flow, prefect_server
    from mpe.runtime.project_lock import project_lock

    path = _project_params(args)
    _own_children()
    # taken before Prefect starts, so a second run is refused (or waits) at once
    with project_lock(".", wait=args.wait, say=lambda m: print(m, file=sys.stderr)):
        _write_overrides(args, path)
        with prefect_server():
            retrain = load_flow(".", "retrain.py:retrain")
            retrain(params_path=str(path), project_dir=".")
    params = _params(args)
    from mpe.evaluation.summary import run_summary

    print(
        run_summary(
            params.metrics_dir,
            [
                params.data.out_dir,
                params.base_model.out_dir,
                params.cache.root,
                params.train.out_dir,
                params.metrics_dir,
                params.evaluate.plots_dir,
            ],
            params.mlflow.tracking_uri,
            params.mlflow.experiment,
            params.dvc.remote,
        )
        + f"\nsearch: the registered model's index in {params.search.out_dir}/; `mpe serve` shows it on "
        f"http://{params.serve.host}:{params.serve.port}/"
    )


def cmd_work_pool(args) -> None:
    from mpe.runtime.prefect_server import ensure_work_pool

    ensure_work_pool(args.name)
    print(f"work pool '{args.name}' (process) is ready")


def cmd_schedule(args) -> None:
    path = _project_params(args)
    _write_overrides(args, path)
    schedule = _params(args).schedule
    from mpe.runtime.prefect_server import load_flow, serve_on_schedule

    _own_children()

    serve_on_schedule(
        load_flow(".", "retrain.py:retrain"),
        schedule.deployment,
        schedule.cron,
        {"params_path": str(path), "project_dir": str(Path.cwd())},
    )


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name (``mpe --params p.yaml train`` and ``mpe
    train --params p.yaml`` are the same); after the name they land in ``*_sub`` and are merged."""
    suffix, default = ("", None) if top else ("_sub", argparse.SUPPRESS)
    parser.add_argument(
        "--params", dest="params" + suffix, default=default, metavar="FILE", help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="set" + suffix,
        action="append",
        default=[] if top else default,
        metavar="KEY.PATH=VALUE",
        help="override one params key, typed and validated like the file (repeatable; e.g. --set train.lr=0.002)",
    )
    parser.add_argument(
        "--tracking-uri",
        dest="tracking_uri" + suffix,
        default=default,
        metavar="URI",
        help="where MLflow tracks (default: MLFLOW_TRACKING_URI, else params mlflow.tracking_uri)",
    )
    parser.add_argument(
        "--debug",
        dest="debug" + suffix,
        action="store_true",
        default=False if top else default,
        help="show the traceback of an error",
    )


def _merge_common(args) -> None:
    for name in ("params", "tracking_uri"):
        if getattr(args, name + "_sub", None) is not None:
            setattr(args, name, getattr(args, name + "_sub"))
    args.set = [*args.set, *getattr(args, "set_sub", [])]
    args.debug = args.debug or getattr(args, "debug_sub", False)


STAGES = [
    ("sources", cmd_sources, "hash the URL list's parts and local model folders (a change reruns what reads them)"),
    ("data", cmd_data, "write the URL lists and download them with img2dataset into webdataset shards"),
    ("base-model", cmd_base_model, "resolve the base LLM, add the APT tokens, save safetensors"),
    ("cache", cmd_cache, "store the frozen trunk's hidden states for every unique caption"),
    ("train", cmd_train, "train with Ray Train (TorchTrainer); resumes a run of the same inputs"),
    ("evaluate", cmd_evaluate, "retrieval, negation and zero-shot metrics and plots"),
    ("register", cmd_register, "register the trained model in MLflow; gate @champion vs @challenger"),
    ("schedule", cmd_schedule, "serve the retrain flow on its cron schedule (Prefect)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpe", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"mpe {__version__}")
    _common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, parent=sub) -> argparse.ArgumentParser:
        cmd = parent.add_parser(name, help=help, description=help)
        _common(cmd, top=False)
        cmd.set_defaults(func=func)
        return cmd

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    init = command("init", cmd_model_init, "write an untrained model folder", model)
    init.add_argument("--base", help="local dir, hub id, or bundled name (default: params base_model.name)")
    init.add_argument("--out", required=True, help="the model folder to write")
    init.add_argument("--num-prompts", type=_positive(int), help="K (default: params model.text.num_prompts)")

    emb = command("embed", cmd_embed, "embed a text file (one caption per line), a folder of images or of videos")
    emb.add_argument("--model", required=True, help="a trained model folder")
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="captions, one per line (blank lines skipped)")
    src.add_argument("--image-dir", help="a folder of images")
    src.add_argument("--video-dir", help="a folder of videos (.mp4 .webm .mkv .mov .avi), one row each, sorted by name")
    emb.add_argument("--out", required=True, help="the .npy file to write")
    emb.add_argument("--batch-size", type=_positive(int), default=32, help="rows per forward pass")

    for name, func, text in STAGES:
        command(name, func, text)
    run_ = command("run", cmd_run, "the whole retrain flow (Prefect): DVC stages, push, register")
    run_.add_argument(
        "--wait",
        nargs="?",
        type=_positive(float),
        const=None,
        default=0.0,
        metavar="SECONDS",
        help="if another run holds this project, wait for it (at most SECONDS) instead of stopping",
    )
    pool = command("work-pool", cmd_work_pool, "create the Prefect process work pool (offline-safe)")
    pool.add_argument("--name", default="local-process", help="the work pool's name")
    cmp_ = command("compare", cmd_compare, "a markdown table of the last N MLflow runs, or of a suite")
    cmp_.add_argument("--last", type=_positive(int), default=5, help="how many of the latest runs")
    cmp_.add_argument("--out", default="metrics/compare.md", help="the markdown file written")
    cmp_.add_argument("--suite", help="an experiment suite's cells (mean ± std over seeds, from MLflow)")
    cmp_.add_argument("--form", default="quick", help="the suite's budget (with --suite)")
    plan = command("plan", cmd_plan, "predict every stage's data, FLOPs, time and accelerator-hours on a cluster")
    plan.add_argument(
        "--cluster", action="append", required=True, metavar="FILE", help="a cluster description (repeatable)"
    )
    plan.add_argument(
        "--cache-dtype",
        action="append",
        choices=["float16", "bfloat16", "float32", "float8_e4m3_row", "float8_e4m3_tensor"],
        help="plan with this cache storage dtype (repeatable; default params cache.dtype)",
    )
    plan.add_argument("--samples", type=_positive(float), help="state the training samples (scales measured figures)")
    plan.add_argument("--caption-tokens", type=_positive(float), help="state the mean tokens per caption")
    plan.add_argument("--image-bytes", type=_positive(float), help="state the bytes per sample in the shards")
    plan.add_argument("--model-config", help="the LLM's config.json (or its folder) instead of the params' base model")
    plan.add_argument("--peak", help="a peak.json (benchmarks/peak.py) for a 'measured' cluster (default: measure)")
    plan.add_argument("--json", help="also write the plans as JSON here")
    rp = command("reproduce", cmd_reproduce, "restore a registered version's lock, params and outputs (dvc pull)")
    rp.add_argument("--model", help="registered model name (default: params register.model_name)")
    which = rp.add_mutually_exclusive_group()
    which.add_argument("--version", help="the registered version")
    which.add_argument("--alias", help="the registered alias (champion, challenger)")
    rp.add_argument("--only", choices=["model"], help="pull the trained model alone (what a serving host needs)")
    params = sub.add_parser("params", help="the effective params").add_subparsers(dest="params_command", required=True)
    command("show", cmd_params_show, "print the params after --set, validated (what a stage would read)", params)
    ts = command(
        "tracking-server", cmd_tracking_server, "a local MLflow tracking server on PostgreSQL (start, stop, status)"
    )
    ts.add_argument("action", choices=["start", "stop", "status"], help="start (or reuse), stop, or show it")
    ts.add_argument("--dir", default=".mlflow-pg", help="its folder: cluster, passfile, artifacts, logs")
    ts.add_argument(
        "--port",
        type=_positive(int),
        default=5050,
        help="the MLflow server's port on 127.0.0.1 (default 5050; `make ui` uses 5000)",
    )
    ts.add_argument("--os-user", help="as root: the unprivileged OS user that runs PostgreSQL (default postgres)")
    ts.add_argument("--workers", type=_positive(int), default=2, help="MLflow server worker processes")
    sv = command("serve", cmd_serve, "serve the model over HTTP (MLflow's scoring protocol, POST /invocations)")
    sv.add_argument(
        "--model",
        help="models:/NAME@ALIAS, runs:/ID/model, or a model folder (default: models:/<register.model_name>@champion)",
    )
    sv.add_argument("--host", help="interface to bind (default: params serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=_positive(int), help="port (default: params serve.port, 8000)")
    sv.add_argument("--max-body-mb", type=_positive(float), help="request body limit in MiB (default: params serve)")
    sv.add_argument("--max-rows", type=_positive(int), help="rows per request (default: params serve.max_rows)")
    sv.add_argument("--max-caption-chars", type=_positive(int), help="longest caption accepted (default: params serve)")
    sv.add_argument(
        "--max-request-megapixels",
        type=_positive(float),
        help="decoded pixels of a request's images together, in millions (default: params serve)",
    )
    sv.add_argument(
        "--index",
        metavar="DIR",
        help="search index folder built from this model (default: the registered version's own, else "
        "search.out_dir if built from this model); adds /search and the search page at /",
    )
    sv.add_argument("--no-search", action="store_true", help="serve embeddings only, even if an index is at hand")
    ix = command("index", cmd_index, "build the search index of a model's image embeddings (FAISS) for mpe serve")
    ix.add_argument("--model", help="a model folder, models:/NAME@ALIAS or runs:/ID/model (default: train.out_dir)")
    ix.add_argument("--out", metavar="DIR", help="the index folder (default: params search.out_dir)")
    ui = command("ui", cmd_ui, "the MLflow and Prefect UIs on 127.0.0.1 (Ctrl-C stops both)")
    ui.add_argument("--mlflow-port", type=_positive(int), default=5000, help="the MLflow UI's port")
    ui.add_argument("--prefect-port", type=_positive(int), default=4200, help="the Prefect UI's port")
    rw = command("reweight", cmd_reweight, "aspect weights chosen on the validation split, test gain")
    rw.add_argument("--model", help="model folder (default: train.out_dir)")
    exp = sub.add_parser("experiments", help="experiment suites (experiments/<name>.yaml)").add_subparsers(
        dest="experiments_command", required=True
    )
    er = command("run", cmd_experiments_run, "run every cell and seed of a suite (resumes a stopped one)", exp)
    er.add_argument("name", help="the suite: experiments/<name>.yaml")
    er.add_argument("--form", default="quick", help="the suite's budget (forms in the suite file)")
    er.add_argument("--only", nargs="*", help="run only these cells")
    ep = command("report", cmd_experiments_report, "write docs/RESULTS.md and a plot from MLflow", exp)
    ep.add_argument("name", help="the suite: experiments/<name>.yaml")
    ep.add_argument("--form", default="quick", help="the suite's budget")
    ep.add_argument("--out", default="docs/RESULTS.md", help="the report written (a plot beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    from mpe.errors import user_message
    from mpe.runtime.lifeline import terminate_as_interrupt, terminated_by
    from mpe.runtime.telemetry import disable_telemetry

    disable_telemetry()
    args = build_parser().parse_args(argv)
    _merge_common(args)
    if args.tracking_uri:  # for this command and every stage it runs (their own resolver reads it)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if argv is None and threading.current_thread() is threading.main_thread():  # the command, not a caller's test
        terminate_as_interrupt()  # `kill`, `timeout`, a scheduler's stop: a Ctrl-C, finished work kept

    def stopped() -> int:  # 130 for a Ctrl-C, 128 + the signal for SIGTERM, as a shell reports them
        return 128 + terminated_by() if terminated_by() else 130

    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.command in SERVING_COMMANDS:  # nothing to resume: Ctrl-C is how these end
            print(f"mpe {args.command}: stopped", file=sys.stderr)
            return 130
        how = f"stopped by {signal.Signals(terminated_by()).name}" if terminated_by() else "interrupted"
        print(f"mpe {args.command}: {how}; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return stopped()
    except Exception as err:
        message = user_message(err)
        if message is None or args.debug:
            raise
        if isinstance(err, Interrupted):
            how = f"stopped by {signal.Signals(terminated_by()).name}: " if terminated_by() else ""
            print(f"mpe {args.command}: {how}{message}", file=sys.stderr)
            return stopped()
        print(
            f"mpe {args.command}: error: {message}" + ("" if "\n" in message else " (--debug shows the traceback)"),
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
