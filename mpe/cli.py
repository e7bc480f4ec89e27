"""The ``mpe`` command line: one sub-command per stage (each calls ``mpe.stages.<stage>.run``), the whole
flow, and the model utilities. Errors a user can act on print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpe.config import Params, load_params
from mpe.errors import ConfigError, Interrupted

DEFAULT_PARAMS = "params.yaml"


def _params(args, required: bool = True) -> Params:
    """The params file named by ``--params``; the built-in defaults only where a command allows it and
    no file was named."""
    path = Path(args.params or DEFAULT_PARAMS)
    if not path.exists():
        if args.params or required:
            where = "" if args.params else f" in {Path.cwd()} (run from the project directory, or pass --params)"
            raise ConfigError(f"{path}: params file not found{where}")
        return Params()
    return load_params(path)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def cmd_model_init(args) -> None:
    from mpe.base_model import resolve_base_model
    from mpe.model import MultiPromptCLIP

    params = _params(args, required=False)
    cfg = params.model
    if args.num_prompts is not None:
        text = cfg.text.model_copy(update={"num_prompts": args.num_prompts})
        cfg = cfg.model_validate({**cfg.model_dump(), "text": text.model_dump()})
    base = args.base or params.base_model.name
    base_dir = resolve_base_model(base, params.base_model.revision, params.base_model.save_dtype)
    model = MultiPromptCLIP.from_base(base_dir, cfg, trust_remote_code=params.base_model.trust_remote_code,
                                      provenance={"base_model": base})
    model.save_pretrained(args.out)
    print(f"wrote an untrained {cfg.text.pooling} model (K={cfg.text.num_prompts}, base {base}) to {args.out}")


def cmd_embed(args) -> None:
    from mpe.embed import embed_image_files, embed_texts, list_images, read_text_file, save_npy
    from mpe.model import MultiPromptCLIP

    blank = []
    if args.text_file:
        texts, blank = read_text_file(args.text_file)
    else:
        images = list_images(args.image_dir)
    model = MultiPromptCLIP.from_pretrained(args.model)
    arr = embed_texts(model, texts, args.batch_size) if args.text_file else \
        embed_image_files(model, images, args.batch_size)
    save_npy(args.out, arr)
    skipped = f"; skipped {len(blank)} blank lines ({', '.join(map(str, blank[:10]))})" if blank else ""
    print(f"wrote {arr.shape[0]} embeddings of dimension {arr.shape[1]} to {args.out}{skipped}")


def cmd_sources(args) -> None:
    from mpe.stages import sources

    listing = sources.run(_params(args))
    print(f"{listing['source']}: {len(listing['parts'])} URL list parts")


def cmd_data(args) -> None:
    from mpe.stages import data

    stats = data.run(_params(args))
    for split, s in stats["splits"].items():
        print(f"{split}: {s['successes']}/{s['count']} images ({s['success_rate']:.1%})")


def cmd_base_model(args) -> None:
    from mpe.stages import base_model

    out = base_model.run(_params(args))
    print(f"wrote the base model with {out['apt_tokens']} APT tokens to {out['out_dir']}")


def cmd_cache(args) -> None:
    from mpe.stages import cache

    _print_json(cache.run(_params(args)))


def cmd_train(args) -> None:
    from mpe.stages import train

    _print_json(train.run(_params(args)))


def cmd_evaluate(args) -> None:
    from mpe.stages import evaluate

    report = evaluate.run(_params(args))
    _print_json({k: v for k, v in report.items() if k != "details"})


def cmd_register(args) -> None:
    from mpe.stages import register

    _print_json(register.run(_params(args), Path(".")))


def cmd_compare(args) -> None:
    from mpe.compare import write_comparison
    from mpe.tracking_settings import tracking_settings

    if args.suite:
        from mpe.experiments.report import collect, table_rows, terminal
        from mpe.experiments.suite import load_suite, suite_path

        suite = load_suite(suite_path(args.suite))
        cells = collect(tracking_settings(load_params(suite.base).mlflow), suite.name, args.form)
        if not cells:
            raise ConfigError(f"no finished runs of suite '{suite.name}' (form {args.form}) in MLflow yet: "
                              f"`mpe experiments run {suite.name}` first")
        print(terminal(table_rows(cells, list(suite.cells), suite.baseline, suite.metrics), suite.metrics), end="")
        return
    print(write_comparison(tracking_settings(_params(args).mlflow), Path(args.out), args.last), end="")


def cmd_reproduce(args) -> None:
    from mpe.reproduce import reproduce
    from mpe.tracking_settings import tracking_settings

    params = _params(args, required=False)
    settings = tracking_settings(params.mlflow)
    if args.tracking_uri:
        settings = tracking_settings(params.mlflow.model_copy(update={"tracking_uri": args.tracking_uri}))
    if not args.version and not args.alias:
        raise ConfigError("mpe reproduce: name the version (--version N) or the alias (--alias champion)")
    result = reproduce(Path("."), settings, args.model or params.registry.model_name, args.version, args.alias,
                       args.only == "model")
    _print_json(result)


def cmd_tracking_server(args) -> None:
    from mpe import tracking_server

    if args.action == "start":
        state = tracking_server.start(args.dir, args.port, args.os_user, args.workers)
        how = "already running" if state["already_running"] else "started"
        print(f"MLflow tracking server {how}: {state['tracking_uri']} (PostgreSQL on 127.0.0.1:{state['pg_port']}, "
              f"pid {state['pid']}, logs and artifacts in {args.dir}/)\n"
              f"use it: mlflow.tracking_uri: {state['tracking_uri']} in params.yaml")
    elif args.action == "stop":
        stopped = tracking_server.stop(args.dir)
        print("stopped " + ", ".join(stopped) if stopped else f"nothing was running in {args.dir}")
    else:
        state = tracking_server.status(args.dir)
        if state is None:
            print(f"not running ({args.dir})")
            raise SystemExit(3)
        _print_json(state)


def cmd_serve(args) -> None:
    import os

    from mpe.config import ServeConfig, validate
    from mpe.serving import serve
    from mpe.tracking_settings import tracking_settings

    params = _params(args, required=False)
    overrides = {k: getattr(args, k) for k in ("host", "port", "max_body_mb", "max_rows", "max_caption_chars")
                 if getattr(args, k) is not None}
    cfg = validate(ServeConfig, {**params.serve.model_dump(), **overrides}, "serve (params and options)")
    # the store: the option, else MLflow's own variable, else the project's (params) store
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
        or tracking_settings(params.mlflow).tracking_uri
    serve(args.model or f"models:/{params.registry.model_name}@champion", cfg, tracking_uri)


def cmd_reweight(args) -> None:
    from mpe.stages import reweight

    _print_json(reweight.run(_params(args), args.model))


def cmd_experiments_run(args) -> None:
    from flows.local_server import prefect_server
    from mpe.project_lock import project_lock

    with project_lock(".", wait=0), prefect_server():
        from flows.experiments import experiment_suite

        print(experiment_suite(args.name, args.form, ".", args.only or None))


def cmd_experiments_report(args) -> None:
    import subprocess

    from mpe.atomic import write_text
    from mpe.experiments.report import collect, plot, results_markdown, table_rows
    from mpe.experiments.suite import load_suite, suite_path
    from mpe.tracking import log_to_run, parent_run
    from mpe.tracking_settings import tracking_settings

    suite = load_suite(suite_path(args.name))
    settings = tracking_settings(load_params(suite.base).mlflow)
    cells = collect(settings, suite.name, args.form)
    if not cells:
        raise ConfigError(f"no finished runs of suite '{suite.name}' (form {args.form}) in MLflow yet")
    out = Path(args.out)
    png = out.with_name(f"results_{suite.name}_{args.form}.png")
    rows = table_rows(cells, list(suite.cells), suite.baseline, suite.metrics)
    plot(rows, [m for m in suite.metrics if "R@5" in m][:4] or suite.metrics[:2], png,
         f"{suite.name} ({args.form}): mean ± std over seeds")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = f"mpe experiments report {suite.name} --form {args.form}"
    write_text(out, results_markdown(suite, args.form, cells, command, commit or "unknown", png.name))
    parent = parent_run(settings, f"{suite.name} ({args.form})",
                        {"mpe.suite": suite.name, "mpe.form": args.form, "mpe.suite_parent": "true"})
    log_to_run(settings, parent, artifacts=[out, png], artifact_path="report")
    print(f"wrote {out} and {png} ({len(cells)} cells); logged to MLflow run {parent}")


def _project_params(args) -> Path:
    """``mpe run``/``schedule`` run the DVC stages, which read the project's ``params.yaml``: any other file
    would mix two configurations, so it is refused."""
    path = Path(args.params or DEFAULT_PARAMS)
    project = Path.cwd() / DEFAULT_PARAMS
    if path.resolve() != project.resolve():
        raise ConfigError(f"{path}: `mpe {args.command}` runs the DVC pipeline, which reads {project}; copy your "
                          f"file there (cp {path} {DEFAULT_PARAMS}) or run the stages one by one with --params")
    _params(args)  # validated before anything runs
    return path


def cmd_run(args) -> None:
    from flows.local_server import prefect_server
    from mpe.summary import run_summary

    from mpe.project_lock import project_lock

    path = _project_params(args)
    # taken before Prefect starts, so a second run is refused (or waits) at once
    with project_lock(".", wait=args.wait, say=lambda m: print(m, file=sys.stderr)):
        with prefect_server():
            from flows.retrain import retrain

            retrain(params_path=str(path), project_dir=".")
    print(run_summary(load_params(path)))


def cmd_work_pool(args) -> None:
    from flows.retrain import ensure_work_pool

    ensure_work_pool(args.name)
    print(f"work pool '{args.name}' (process) is ready")


def cmd_schedule(args) -> None:
    from flows.retrain import serve_nightly

    path = _project_params(args)
    serve_nightly(load_params(path).schedule, str(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpe", description=__doc__)
    p.add_argument("--params", default=None, help="params file (default: params.yaml)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    init = model.add_parser("init", help="write an untrained model folder")
    init.add_argument("--base", help="local dir, hub id, or bundled name (default: params base_model.name)")
    init.add_argument("--out", required=True)
    init.add_argument("--num-prompts", type=int)
    init.set_defaults(func=cmd_model_init)

    emb = sub.add_parser("embed", help="embed a text file (one caption per line) or a folder of images")
    emb.add_argument("--model", required=True)
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file")
    src.add_argument("--image-dir")
    emb.add_argument("--out", required=True)
    emb.add_argument("--batch-size", type=int, default=32)
    emb.set_defaults(func=cmd_embed)

    for name, func, text in [
        ("sources", cmd_sources, "list the URL list's parts with their hashes (a new part reruns data)"),
        ("data", cmd_data, "write the URL lists and download them with img2dataset into webdataset shards"),
        ("base-model", cmd_base_model, "resolve the base LLM, add the APT tokens, save safetensors"),
        ("cache", cmd_cache, "store the frozen trunk's hidden states for every unique caption"),
        ("train", cmd_train, "train with Ray Train (TorchTrainer); resumes a run of the same name"),
        ("evaluate", cmd_evaluate, "retrieval, negation and zero-shot metrics and plots"),
        ("register", cmd_register, "register the trained model in MLflow; gate @champion vs @challenger"),
        ("schedule", cmd_schedule, "serve the retrain flow on its cron schedule (Prefect)"),
    ]:
        sub.add_parser(name, help=text).set_defaults(func=func)
    run_ = sub.add_parser("run", help="the whole retrain flow (Prefect): DVC stages, push, register")
    run_.add_argument("--wait", nargs="?", type=float, const=None, default=0.0, metavar="SECONDS",
                      help="if another run holds this project, wait for it (at most SECONDS) instead of stopping")
    run_.set_defaults(func=cmd_run)
    pool = sub.add_parser("work-pool", help="create the Prefect process work pool (offline-safe)")
    pool.add_argument("--name", default="local-process")
    pool.set_defaults(func=cmd_work_pool)
    cmp_ = sub.add_parser("compare", help="a markdown table of the last N MLflow runs, or of a suite")
    cmp_.add_argument("--last", type=int, default=5)
    cmp_.add_argument("--out", default="metrics/compare.md")
    cmp_.add_argument("--suite", help="an experiment suite's cells (mean ± std over seeds, from MLflow)")
    cmp_.add_argument("--form", default="quick")
    cmp_.set_defaults(func=cmd_compare)
    rp = sub.add_parser("reproduce", help="restore a registered version's lock, params and outputs (dvc pull)")
    rp.add_argument("--model", help="registered model name (default: params register.model_name)")
    which = rp.add_mutually_exclusive_group()
    which.add_argument("--version")
    which.add_argument("--alias")
    rp.add_argument("--only", choices=["model"], help="pull the trained model alone (what a serving host needs)")
    rp.add_argument("--tracking-uri", help="the tracking store the model is registered in (default: params)")
    rp.set_defaults(func=cmd_reproduce)
    ts = sub.add_parser("tracking-server", help="a local MLflow tracking server on PostgreSQL (start, stop, status)")
    ts.add_argument("action", choices=["start", "stop", "status"])
    ts.add_argument("--dir", default=".mlflow-pg", help="its folder: cluster, passfile, artifacts, logs")
    ts.add_argument("--port", type=int, default=5000, help="the MLflow server's port on 127.0.0.1")
    ts.add_argument("--os-user", help="as root: the unprivileged OS user that runs PostgreSQL (default postgres)")
    ts.add_argument("--workers", type=int, default=2, help="MLflow server worker processes")
    ts.set_defaults(func=cmd_tracking_server)


    sv = sub.add_parser("serve", help="serve the model over HTTP (MLflow's scoring protocol, POST /invocations)")
    sv.add_argument("--model", help="models:/NAME@ALIAS, runs:/ID/model, or a model folder "
                                    "(default: models:/<register.model_name>@champion)")
    sv.add_argument("--tracking-uri", help="the tracking store a models:/ URI is registered in "
                                           "(default: MLFLOW_TRACKING_URI, else params mlflow.tracking_uri)")
    sv.add_argument("--host", help="interface to bind (default: params serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default: params serve.port, 8000)")
    sv.add_argument("--max-body-mb", type=float, help="request body limit in MiB (default: params serve.max_body_mb)")
    sv.add_argument("--max-rows", type=int, help="rows per request (default: params serve.max_rows)")
    sv.add_argument("--max-caption-chars", type=int, help="longest caption accepted (default: params serve)")
    sv.set_defaults(func=cmd_serve)
    rw = sub.add_parser("reweight", help="aspect weights chosen on the validation split, test gain")
    rw.add_argument("--model", help="model folder (default: train.out_dir)")
    rw.set_defaults(func=cmd_reweight)
    exp = sub.add_parser("experiments", help="experiment suites (experiments/<name>.yaml)").add_subparsers(
        dest="experiments_command", required=True)
    er = exp.add_parser("run", help="run every cell and seed of a suite (resumes a stopped one)")
    er.add_argument("name")
    er.add_argument("--form", default="quick", help="the suite's budget (forms in the suite file)")
    er.add_argument("--only", nargs="*", help="run only these cells")
    er.set_defaults(func=cmd_experiments_run)
    ep = exp.add_parser("report", help="write docs/RESULTS.md and a plot from MLflow")
    ep.add_argument("name")
    ep.add_argument("--form", default="quick")
    ep.add_argument("--out", default="docs/RESULTS.md")
    ep.set_defaults(func=cmd_experiments_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from mpe.errors import user_message
    from mpe.ray_cluster import prefer_loopback
    from mpe.telemetry import disable_telemetry

    disable_telemetry()
    args = build_parser().parse_args(argv)
    try:
        if Path(args.params or DEFAULT_PARAMS).exists():
            prefer_loopback(_params(args).ray)  # before anything imports ray
        args.func(args)
    except KeyboardInterrupt:
        print(f"mpe {args.command}: interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None or args.debug:
            raise
        print(f"mpe {args.command}: error: {message}" + ("" if "\n" in message else " (--debug shows the traceback)"),
              file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
