"""The `odyssey` command.

    odyssey data build --out DIR [--preset tiny|full|none] [--source [KIND:]PATH ...] [--seed N] [--set k=v ...]
                       [--workers N] [--address ADDR]
    odyssey tokenizer train --corpus DIR [--vocab-size N] [--out FILE]
    odyssey data pack --corpus DIR [--tokenizer FILE] [--seq-len N] [--out DIR] [--workers N] [--address ADDR]
    odyssey model presets
    odyssey train --config RECIPE [--set k=v ...]      (= python -m train)
    odyssey tune --config SWEEP [--set k=v ...] [--transfer]  (= python -m tune)
    odyssey export SOURCE --out DIR [--best] [--format safetensors|onnx|hf] [--quantize int8]
                   (SOURCE: a checkpoint, a run, or a model directory: ours or a Hugging Face Llama's)
    odyssey serve --model DIR [--port N] [--set k=v ...]  |  odyssey serve key|stop
    odyssey cluster check [FILE ...]                    (`ray up` configs, KubeRay manifests)
    odyssey cluster local-up [--config cluster/fake-gpu.yaml]  |  odyssey cluster local-down
    odyssey cluster env [local|serve|demo]              (export lines for Ray's CLI: eval "$(...)")
    odyssey cluster netns-up [--hosts 3] [--cpus 2]  |  netns-run HOST -- CMD ...  |  netns-crash HOST
                    |  netns-restore HOST  |  netns-down    (hosts of their own on one Linux machine, as root)
    odyssey eval MODEL_OR_CHECKPOINT [--corpus DIR] [--tasks a,b] [--limit N] [--backend B] [--out DIR]
                 [--no-code-checks]
    odyssey promote RUN --serve-config serve/config.yaml [--metrics a,b] [--dry-run]
    odyssey demo [--keep-serving] [--set k=v ...]  |  odyssey demo stop

Errors a user can fix are printed as one line `odyssey: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from odyssey import entrypoint, logs
from odyssey.errors import OdysseyError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odyssey", description="Pretrain, sweep and serve one multitask model."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parser(sub)
    _tokenizer_parser(sub)
    _model_parser(sub)
    _demo_parser(sub)
    _eval_parser(sub)
    _promote_parser(sub)
    _train_and_tune_parser(sub)
    _export_parser(sub)
    _serve_parser(sub)
    _cluster_parser(sub)
    return parser


def _data_parser(sub) -> None:
    """`odyssey data build | pack`"""
    data = sub.add_parser("data", help="build the multitask corpus and pack it into token blocks")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="build the corpus (Parquet + manifest)")
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--preset", default="tiny", help="tiny | full | none (only --source files)")
    build.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="[KIND:]PATH_OR_NAME",
        help="KIND:PATH_OR_NAME, a public dataset through an adapter (kinds: summarize, moderate, retrieval, "
        "code, text; PATH a local file or directory, NAME[@CONFIG] a Hugging Face hub dataset), or a "
        "Parquet/JSONL file in the corpus schema",
    )
    build.add_argument("--seed", type=int, default=None)
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing corpus (only once the new one is complete)",
    )
    entrypoint.add_set(build, "--set max_docs.legal=20")
    _add_workers(build)
    pack = data_sub.add_parser("pack", help="tokenize and pack a corpus into fixed-length blocks")
    pack.add_argument("--corpus", required=True, type=Path)
    pack.add_argument("--tokenizer", type=Path, help="default: CORPUS/tokenizer.json")
    pack.add_argument("--seq-len", type=int, default=256)
    pack.add_argument("--out", type=Path, help="default: CORPUS/blocks-SEQ_LEN")
    pack.add_argument("--seed", type=int, default=0)
    pack.add_argument("--overwrite", action="store_true")
    _add_workers(pack)


def _add_workers(parser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel Ray Data tasks (default: every CPU of the cluster; 0: in this process, no Ray)",
    )
    parser.add_argument(
        "--address", help="the Ray cluster to run on (default: RAY_ADDRESS, else an embedded one)"
    )


def _data_workers(args) -> int | None:
    """The Ray Data tasks to run (0: in this process): on the cluster at --address (joined now), or on an
    embedded one, which starts when the first parallel stage runs (after the inputs are checked)."""
    from odyssey import cluster
    from odyssey.errors import ConfigError

    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 1 or more, or 0 to run in this process")
    if args.workers == 0:
        return 0
    if args.address or os.environ.get("RAY_ADDRESS"):
        cluster.connect(args.address)
        return args.workers  # None: every CPU of that cluster
    return args.workers or os.cpu_count() or 1


def _tokenizer_parser(sub) -> None:
    """`odyssey tokenizer train`"""
    tokenizer = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser("train", help="train on a corpus's train split")
    train.add_argument("--corpus", required=True, type=Path)
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--out", type=Path, help="default: CORPUS/tokenizer.json")


def _model_parser(sub) -> None:
    """`odyssey model presets`"""
    model = sub.add_parser("model", help="model presets")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("presets", help="list presets with parameters and FLOPs per token")


def _demo_parser(sub) -> None:
    """`odyssey demo [stop]`"""
    demo = sub.add_parser(
        "demo",
        help="local cluster -> data -> pretrain (2 workers, ZeRO-2) -> eval -> serve -> call every endpoint",
    )
    demo.add_argument(
        "action", nargs="?", choices=["run", "stop"], default="run", help="stop: end a demo kept serving"
    )
    demo.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave its cluster and app up (`odyssey demo stop` ends them)",
    )
    entrypoint.add_set(demo, "--set steps=1000 --set port=8001")


def _eval_parser(sub) -> None:
    """`odyssey eval`"""
    evaluate = sub.add_parser("eval", help="score a model on every task's held-out split (Ray tasks)")
    evaluate.add_argument("model", type=Path, help="an exported model, a checkpoint_* directory or a run")
    evaluate.add_argument("--corpus", type=Path, help="default: the corpus the model's run trained on")
    evaluate.add_argument("--tasks", help="comma-separated (default: all): summarize,moderate,find,code,lm")
    evaluate.add_argument("--split", default="test", choices=["val", "test"])
    evaluate.add_argument("--limit", type=int, help="at most this many examples per task")
    evaluate.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    evaluate.add_argument(
        "--out", type=Path, help="write eval.json and eval.md here (default: runs/eval/<model>-<time>/)"
    )
    evaluate.add_argument(
        "--no-code-checks",
        action="store_true",
        help="do not run generated code against its prompt's doctests (nothing is executed)",
    )
    evaluate.add_argument(
        "--serve-config",
        type=Path,
        help="answer as this Serve config's app does (its `answers:` settings); default: the shipped defaults",
    )
    evaluate.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else embedded)")


def _promote_parser(sub) -> None:
    """`odyssey promote`"""
    promote = sub.add_parser(
        "promote",
        help="export a run's best checkpoint, evaluate it, roll it out only if it beats the served model",
    )
    promote.add_argument("source", type=Path, help="a run directory (its best checkpoint) or a checkpoint_*")
    promote.add_argument("--serve-config", type=Path, required=True, help="the Serve config to roll out")
    promote.add_argument(
        "--metrics",
        help="comma-separated task.metric that must not get worse, one at least better "
        "(default: lm.perplexity,summarize.rouge_l,moderate.macro_f1,find.mrr,code.parse_rate)",
    )
    promote.add_argument("--corpus", type=Path, help="default: the corpus the run trained on")
    promote.add_argument("--limit", type=int, help="at most this many examples per task")
    promote.add_argument(
        "--address", help="the cluster's dashboard URL (default: RAY_DASHBOARD_ADDRESS, else the local one)"
    )
    promote.add_argument("--dry-run", action="store_true", help="evaluate and decide, deploy nothing")


def _train_and_tune_parser(sub) -> None:
    """`odyssey train | tune`: python -m train | tune's own parsers take the rest"""
    train = sub.add_parser("train", help="pretrain with Ray Train + DeepSpeed (same as python -m train)")
    train.add_argument("train_args", nargs=argparse.REMAINDER, help="python -m train's arguments")
    tune = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (same as python -m tune)")
    tune.add_argument("tune_args", nargs=argparse.REMAINDER, help="python -m tune's arguments")


def _export_parser(sub) -> None:
    """`odyssey export`"""
    export = sub.add_parser(
        "export", help="a training checkpoint -> safetensors + config + tokenizer (or Hugging Face's format)"
    )
    export.add_argument(
        "source",
        type=Path,
        help="a checkpoint_* directory, a run directory, or a model directory (ours or a Hugging Face Llama's)",
    )
    export.add_argument("--out", required=True, type=Path)
    export.add_argument(
        "--best", action="store_true", help="from a run: the lowest validation loss, not the latest"
    )
    export.add_argument("--overwrite", action="store_true")
    export.add_argument(
        "--format",
        choices=["safetensors", "onnx", "hf"],
        default="safetensors",
        help="onnx: also write model.onnx (KV-cache inputs/outputs) for `backend: onnxruntime`; hf: Hugging "
        "Face's Llama layout, for transformers' from_pretrained and vLLM",
    )
    export.add_argument(
        "--quantize", choices=["int8"], help="with --format onnx: int8 weights (dynamic quantization)"
    )


def _serve_parser(sub) -> None:
    """`odyssey serve [stop]`"""
    serve = sub.add_parser(
        "serve", help="deploy the serving app (serve/config.yaml) and return once every endpoint answers"
    )
    serve.add_argument(
        "action",
        nargs="?",
        choices=["deploy", "key", "stop"],
        default="deploy",
        help="key: print the API key clients send (written first on a machine with none)",
    )
    serve.add_argument(
        "--model",
        type=Path,
        help="an exported model directory (`odyssey export`) or a Hugging Face Llama directory",
    )
    serve.add_argument("--port", type=int, help="HTTP port on loopback (default: the config's, 8000)")
    serve.add_argument("--config", type=Path, help="a Serve config (default: serve/config.yaml)")
    serve.add_argument(
        "--address", help="a cluster's dashboard URL (default: RAY_DASHBOARD_ADDRESS, else a local cluster)"
    )
    entrypoint.add_set(serve, "--set model.max_replicas=4")


def _cluster_parser(sub) -> None:
    """`odyssey cluster check | local-up | local-down | env`"""
    clusters = sub.add_parser(
        "cluster", help="check cluster files; a local autoscaling cluster of fake GPU nodes"
    )
    cluster_sub = clusters.add_subparsers(dest="cluster_command", required=True)
    check = cluster_sub.add_parser(
        "check", help="validate `ray up` configs (Ray's schema, then ours) and KubeRay manifests"
    )
    check.add_argument("files", nargs="*", type=Path, help="default: every file under cluster/")
    up = cluster_sub.add_parser(
        "local-up", help="a head on loopback whose autoscaler adds fake GPU nodes here"
    )
    up.add_argument("--config", type=Path, help="a fake_multinode config (default: cluster/fake-gpu.yaml)")
    cluster_sub.add_parser("local-down", help="stop the local cluster and every node it added")
    netns_up = cluster_sub.add_parser(
        "netns-up",
        help="a Ray cluster of hosts with addresses of their own on this machine (Linux network namespaces; root)",
    )
    netns_up.add_argument("--hosts", type=int, default=3, help="hosts, the head's included (default 3)")
    netns_up.add_argument(
        "--cpus", type=int, default=2, help="logical CPUs of each non-head host (default 2)"
    )
    netns_up.add_argument("--prefix", default="odyssey", help="names of the namespaces (default odyssey)")
    netns_run = cluster_sub.add_parser(
        "netns-run", help="run a command on a host of netns-up, with the cluster's token and address set"
    )
    netns_run.add_argument("host", type=int, help="the host's number (0: the head)")
    netns_run.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    crash = cluster_sub.add_parser("netns-crash", help="lose a host: its link down, its processes SIGKILLed")
    crash.add_argument("host", type=int)
    restore = cluster_sub.add_parser("netns-restore", help="bring a lost host back: link up, Ray node joined")
    restore.add_argument("host", type=int)
    netns_down = cluster_sub.add_parser("netns-down", help="remove the hosts of netns-up and all they run")
    for p in (netns_run, crash, restore, netns_down):
        p.add_argument("--prefix", default="odyssey", help="the prefix netns-up was given (default odyssey)")
    env = cluster_sub.add_parser(
        "env",
        help="export lines that point Ray's CLI (ray status, ray job, serve) at a local cluster: "
        'eval "$(odyssey cluster env)"',
    )
    env.add_argument(
        "role",
        nargs="?",
        choices=["local", "serve", "demo"],
        help="the cluster `odyssey cluster local-up`, `odyssey serve` or `odyssey demo --keep-serving` "
        "started in this checkout (default: the one that is up)",
    )


def _data_build(args) -> dict:
    from odyssey.config import apply_overrides, from_dict
    from odyssey.data.corpus import CorpusConfig, build_corpus

    data = {"preset": args.preset}
    if args.seed is not None:
        data["seed"] = args.seed
    cfg = from_dict(CorpusConfig, apply_overrides(data, args.overrides))
    manifest = build_corpus(args.out, cfg, args.source, overwrite=args.overwrite, workers=_data_workers(args))
    return {
        "corpus": str(args.out),
        "counts": manifest["counts"],
        "total_examples": manifest["total_examples"],
        "sources": {s["name"]: s["per_task"] for s in manifest["sources"]},
        "near_duplicates": manifest["near_duplicates"],
    }


def _data_pack(args) -> dict:
    from odyssey.data.packing import pack_corpus
    from odyssey.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer or args.corpus / "tokenizer.json")
    manifest = pack_corpus(
        args.corpus,
        tok,
        args.seq_len,
        args.out,
        seed=args.seed,
        overwrite=args.overwrite,
        workers=_data_workers(args),
    )
    return {
        "blocks": str(args.out or args.corpus / f"blocks-{args.seq_len}"),
        "tokens": manifest["tokens"],
        "tokens_per_s": manifest["tokens_per_s"],
        "ran": manifest["ran"],
    }


def _tokenizer_train(args) -> dict:
    from odyssey.data.corpus import read_manifest, texts
    from odyssey.tokenizer import Tokenizer

    read_manifest(args.corpus)  # a clear error when it is not a corpus
    tok = Tokenizer.train(texts(args.corpus, "train"), args.vocab_size, show_progress=sys.stderr.isatty())
    out = args.out or args.corpus / "tokenizer.json"
    tok.save(out)
    return {"tokenizer": str(out), "vocab_size": tok.vocab_size, "sha256": tok.fingerprint}


def _model_presets(args) -> dict:
    import torch

    from odyssey.model import PRESETS, Transformer

    rows = {}
    for name, recipe in PRESETS.items():
        cfg = recipe()
        with torch.device("meta"):  # shapes only: no memory, no init
            model = Transformer(cfg)
        rows[name] = {
            "params_M": round(model.num_params() / 1e6, 1),
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "max_seq_len": cfg.max_seq_len,
            "GFLOP_per_token": round(model.flops_per_token() / 1e9, 3),
        }
    return rows


def _export(args) -> dict:
    from train.export import export, export_hf

    if args.quantize and args.format != "onnx":
        raise OdysseyError("--quantize applies to --format onnx only")
    if args.format == "hf":
        return {"model": str(export_hf(args.source, args.out, args.best, args.overwrite))}
    out = export(
        args.source, args.out, args.best, args.overwrite, onnx=args.format == "onnx", quantize=args.quantize
    )
    return {"model": str(out)}


def _serve(args) -> dict:
    from serve import launch

    if args.action == "stop":
        return launch.stop(args.address)
    if args.action == "key":
        print(launch.key(args.config or launch.CONFIG, args.overrides))  # bare, for KEY=$(odyssey serve key)
        return None
    if args.model is None:
        raise OdysseyError(
            "--model is required: an exported model directory (`odyssey export ... --out DIR`)"
        )
    return launch.deploy(
        args.model, args.port, args.overrides, args.config or launch.CONFIG, address=args.address
    )


def _cluster_check(args) -> dict:
    from workflows import cluster_files

    files = args.files or cluster_files.default_files()
    return {"checked": [cluster_files.check(f) for f in files]}


def _cluster_local_up(args) -> dict:
    from workflows import cluster_files, local_cluster

    return local_cluster.local_up(args.config or cluster_files.CLUSTER_DIR / "fake-gpu.yaml")


def _cluster_local_down(args) -> dict:
    from workflows import local_cluster

    return local_cluster.local_down()


def _cluster_netns_up(args) -> dict:
    from workflows import hosts

    if args.hosts < 2:
        raise OdysseyError(f"--hosts {args.hosts}: a head and at least one more host")
    if args.cpus < 1:
        raise OdysseyError(f"--cpus {args.cpus}: each host needs at least 1 CPU")
    print(f"starting {args.hosts} hosts and a Ray cluster across them...", file=sys.stderr)
    up = hosts.up(args.prefix, args.hosts, args.cpus)
    return {
        "hosts": {h.netns: h.address for h in up.hosts},
        "dashboard": up.dashboard_url,
        "address": up.gcs_address,
        "token": up.token_path,
        "run": "odyssey cluster netns-run 0 -- ray status",
        "shell": f"ip netns exec {up.hosts[1].netns} bash  (a shell on host 1)",
        "stop": "odyssey cluster netns-down",
    }


def _netns_hosts(args):
    from workflows import hosts

    up = hosts.load(args.prefix)
    if up is None:
        raise OdysseyError(
            f"no hosts named {args.prefix}-* are up: start them with `odyssey cluster netns-up`"
        )
    if not 0 <= getattr(args, "host", 0) < len(up.hosts):
        raise OdysseyError(f"host {args.host}: the hosts are 0..{len(up.hosts) - 1}")
    return up


def _cluster_netns_run(args) -> None:
    import subprocess

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise OdysseyError(
            "netns-run: give the command after --, e.g. `odyssey cluster netns-run 0 -- ray status`"
        )
    up = _netns_hosts(args)
    sys.exit(subprocess.run(up.command(args.host, argv), env=up.env()).returncode)


def _cluster_netns_crash(args) -> dict:
    up = _netns_hosts(args)
    up.crash(args.host)
    return {"lost": up.hosts[args.host].netns, "address": up.hosts[args.host].address}


def _cluster_netns_restore(args) -> dict:
    up = _netns_hosts(args)
    up.restore(args.host)
    return {"back": up.hosts[args.host].netns, "address": up.hosts[args.host].address}


def _cluster_netns_down(args) -> dict:
    from workflows import hosts

    removed = hosts.down(args.prefix)
    if not removed:
        raise OdysseyError(f"no hosts named {args.prefix}-* are up")
    return {"removed": removed}


def _cluster_env(args) -> None:
    from odyssey import cluster

    print(cluster.env_lines(args.role))


def _demo(args) -> dict:
    from odyssey.config import load_config
    from workflows.demo import DemoConfig, run, stop

    if args.action == "stop":
        return stop()
    overrides = [*args.overrides, *(["keep_serving=true"] if args.keep_serving else [])]
    return run(load_config(DemoConfig, None, overrides))


def _eval(args) -> dict:
    from odyssey import cluster
    from odyssey.evaluation.runner import check_tasks, evaluate, markdown, write_report
    from train.export import exported_model, training_corpus
    from workflows.promote import answer_settings

    tasks = check_tasks(args.tasks.split(",") if args.tasks else None)
    with exported_model(args.model, onnx=args.backend == "onnxruntime") as model:
        corpus = args.corpus or training_corpus(args.model)
        if args.address:
            cluster.connect(args.address)
        report = evaluate(
            model,
            corpus,
            tasks,
            args.split,
            args.limit,
            backend=args.backend,
            settings=answer_settings(args.serve_config),
            code_checks=not args.no_code_checks,
            out=args.out,
        )
    out = args.out or default_eval_dir(report["model_id"])
    if args.out is None:  # evaluate() wrote nothing: the report goes beside the other runs
        write_report(report, out)
    print(markdown(report), file=sys.stderr)
    print(f"report: {out}/eval.json and eval.md", file=sys.stderr)
    return {"model_id": report["model_id"], "metrics": report["metrics"], "out": str(out)}


def default_eval_dir(model_id: str) -> Path:
    """runs/eval/<model>-<digest>-<time>/: one per evaluation, none overwritten."""
    return Path("runs") / "eval" / f"{model_id.replace('@', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _promote(args) -> dict:
    from workflows.promote import DEFAULT_METRICS, promote

    metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    return promote(
        args.source, args.serve_config, metrics, args.corpus, args.limit, args.address, dry_run=args.dry_run
    )


COMMANDS = {
    ("data", "build"): _data_build,
    ("data", "pack"): _data_pack,
    ("tokenizer", "train"): _tokenizer_train,
    ("model", "presets"): _model_presets,
    ("export", None): _export,
    ("demo", None): _demo,
    ("eval", None): _eval,
    ("promote", None): _promote,
    ("serve", None): _serve,
    ("cluster", "check"): _cluster_check,
    ("cluster", "local-up"): _cluster_local_up,
    ("cluster", "local-down"): _cluster_local_down,
    ("cluster", "env"): _cluster_env,
    ("cluster", "netns-up"): _cluster_netns_up,
    ("cluster", "netns-run"): _cluster_netns_run,
    ("cluster", "netns-crash"): _cluster_netns_crash,
    ("cluster", "netns-restore"): _cluster_netns_restore,
    ("cluster", "netns-down"): _cluster_netns_down,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its own parser and its own JSON line
        from train.launch import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["tune"]:
        from tune.sweep import main as tune_main

        return tune_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logs.quiet_driver()  # libraries' chatter at INFO, and what Ray forwards of it
    sub = getattr(args, f"{args.command}_command", None)
    try:
        result = COMMANDS[(args.command, sub)](args)
    except OdysseyError as e:
        parser.exit(2, f"odyssey: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "odyssey: interrupted; outputs being written were discarded\n")
    if result is not None:  # `cluster env` prints shell lines instead
        print(json.dumps(result))  # the last stdout line: one JSON object, for scripts and CI
    return 0
