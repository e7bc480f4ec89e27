"""The ``mpe`` command line: one sub-command per stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load_params(path: str):
    from mpe.config import Params, load_params

    return load_params(path) if Path(path).exists() else Params()


def cmd_model_init(args) -> None:
    from mpe.base_model import resolve_base_model
    from mpe.model import MultiPromptCLIP

    params = _load_params(args.params)
    cfg = params.model
    if args.num_prompts is not None:
        text = cfg.text.model_copy(update={"num_prompts": args.num_prompts})
        cfg = cfg.model_validate({**cfg.model_dump(), "text": text.model_dump()})
    base = args.base or params.base_model.name
    base_dir = resolve_base_model(base, params.base_model.revision, params.base_model.save_dtype)
    model = MultiPromptCLIP.from_base(base_dir, cfg, trust_remote_code=params.base_model.trust_remote_code,
                                      provenance={"base_model_name": base})
    model.save_pretrained(args.out)
    print(f"wrote an untrained {cfg.text.pooling} model (K={cfg.text.num_prompts}, base {base}) to {args.out}")


def cmd_embed(args) -> None:
    from mpe.embed import embed_image_files, embed_texts, list_images, read_text_file, save_npy
    from mpe.model import MultiPromptCLIP

    model = MultiPromptCLIP.from_pretrained(args.model)
    if args.text_file:
        arr = embed_texts(model, read_text_file(args.text_file), args.batch_size)
    else:
        arr = embed_image_files(model, list_images(args.image_dir), args.batch_size)
    save_npy(args.out, arr)
    print(f"wrote {arr.shape[0]} embeddings of dimension {arr.shape[1]} to {args.out}")


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1, default=str))


def cmd_data(args) -> None:
    from mpe.data.prepare import prepare_data

    from mpe.atomic import write_text

    params = _load_params(args.params)
    stats = prepare_data(params.data, params.seed)
    import json

    write_text(Path(params.evaluate.out_dir) / "data.json", json.dumps(stats, indent=1))
    for split, s in stats["splits"].items():
        print(f"{split}: {s['successes']}/{s['count']} images ({s['success_rate']:.1%})")


def cmd_base_model(args) -> None:
    from mpe.base_model import prepare_base_model

    out = prepare_base_model(_load_params(args.params))
    print(f"wrote the base model with APT tokens to {out}")


def cmd_cache(args) -> None:
    from mpe.cache import run_cache_stage

    _print_json(run_cache_stage(_load_params(args.params)))


def cmd_train(args) -> None:
    from mpe.train import run_train_stage

    _print_json(run_train_stage(_load_params(args.params)))


def cmd_evaluate(args) -> None:
    from mpe.evaluate import run_evaluate_stage

    report = run_evaluate_stage(_load_params(args.params))
    _print_json({k: v for k, v in report.items() if k != "details"})


def cmd_register(args) -> None:
    from mpe.registry import run_register_stage

    _print_json(run_register_stage(_load_params(args.params), Path(".")))


def cmd_compare(args) -> None:
    from mpe.compare import write_comparison

    print(write_comparison(_load_params(args.params), Path(args.out), args.last), end="")


def cmd_run(args) -> None:
    from flows.retrain import retrain
    from mpe.summary import run_summary

    retrain(params_path=args.params, project_dir=".")
    print(run_summary(_load_params(args.params)))


def cmd_work_pool(args) -> None:
    from flows.retrain import ensure_work_pool

    ensure_work_pool(args.name)
    print(f"work pool '{args.name}' (process) is ready")


def cmd_schedule(args) -> None:
    from flows.retrain import serve_nightly

    serve_nightly(_load_params(args.params), args.params)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpe", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
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
        ("data", cmd_data, "write the URL lists and download them with img2dataset into webdataset shards"),
        ("base-model", cmd_base_model, "resolve the base LLM, add the APT tokens, save safetensors"),
        ("cache", cmd_cache, "store the frozen trunk's hidden states for every unique caption"),
        ("train", cmd_train, "train with Ray Train (TorchTrainer); resumes a run of the same name"),
        ("evaluate", cmd_evaluate, "retrieval, negation and zero-shot metrics and plots"),
        ("register", cmd_register, "register the trained model in MLflow; gate @champion vs @challenger"),
        ("run", cmd_run, "the whole retrain flow (Prefect): DVC stages, push, register"),
        ("schedule", cmd_schedule, "serve the retrain flow on its cron schedule (Prefect)"),
    ]:
        sub.add_parser(name, help=text).set_defaults(func=func)
    pool = sub.add_parser("work-pool", help="create the Prefect process work pool (offline-safe)")
    pool.add_argument("--name", default="local-process")
    pool.set_defaults(func=cmd_work_pool)
    cmp_ = sub.add_parser("compare", help="a markdown table of the last N MLflow runs")
    cmp_.add_argument("--last", type=int, default=5)
    cmp_.add_argument("--out", default="metrics/compare.md")
    cmp_.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    from mpe.base_model import BaseModelError
    from mpe.cache import CacheMismatch
    from mpe.config import ConfigError
    from mpe.data.url_list import DataError

    from mpe.telemetry import disable_telemetry

    disable_telemetry()
    args = build_parser().parse_args(argv)
    if Path(args.params).exists():
        from mpe.ray_cluster import prefer_loopback

        try:
            prefer_loopback(_load_params(args.params).ray)
        except ConfigError:
            pass  # the command itself reports the bad params
    try:
        args.func(args)
    except (ConfigError, BaseModelError, DataError, CacheMismatch, ValueError, FileNotFoundError,
            NotADirectoryError) as err:
        print(f"mpe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
