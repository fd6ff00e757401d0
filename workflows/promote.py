"""`odyssey promote RUN --serve-config serve/config.yaml`: train -> serve, gated by evaluation.

    1. the run's best checkpoint (lowest validation loss), exported next to the run (RUN/exported/...)
    2. it and the model the app serves now, evaluated on the same validation examples (Ray tasks), answering
       as the app does (its `answers:` settings); the test split only reports, it never decides
    3. the decision: promoted only when no configured metric is worse and at least one is better
    4. the rollout: the Serve config with the new model path, deployed as `serve deploy` does. Only the
       LanguageModel's user_config changes, so running replicas load the new model beside the old one
       and swap (serve/language_model.py): requests in flight finish, none fail. It is done when
       /v1/models names the new model.

Every promotion leaves RUN/promotions/<time>/: both eval reports, decision.json and the deployed config;
the --serve-config file is updated to the promoted model path (so a later `serve deploy` of it does
not roll back). A refusal says which metrics were worse and by how much, and deploys nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import httpx

from odyssey import artifact, atomic, cluster
from odyssey.answers import AnswerSettings
from odyssey.errors import OdysseyError
from odyssey.evaluation.metrics import DIRECTIONS
from serve import launch

log = logging.getLogger(__name__)

DECISION_SPLIT = "val"
DEFAULT_METRICS = ("lm.perplexity", "summarize.rouge_l", "moderate.macro_f1", "find.mrr", "code.parse_rate")


def answer_settings(serve_config: str | Path | None) -> AnswerSettings:
    """The `answers:` settings of a Serve config's app, validated as the app validates them (its defaults
    when None): evaluation answers as that app does."""
    if serve_config is None:
        return AnswerSettings()
    from serve.app import AppArgs

    _, app = launch.read_config(Path(serve_config), [])
    try:
        return AppArgs(model_path="-", **{k: v for k, v in app["args"].items() if k != "model_path"}).answers
    except ValueError as e:
        raise OdysseyError(f"{serve_config}: {e}") from None


def check_metrics(metrics: list[str]) -> list[str]:
    unknown = [m for m in metrics if m not in DIRECTIONS]
    if unknown or not metrics:
        raise OdysseyError(
            f"--metrics: unknown metric {unknown[0]!r}; metrics: {', '.join(DIRECTIONS)}"
            if unknown
            else "--metrics: name at least one"
        )
    return metrics


def decide(candidate: dict, serving: dict, metrics: list[str]) -> tuple[bool, dict]:
    """(promote?, per metric: candidate, serving, verdict better|worse|equal|unmeasured)."""
    table, better, worse = {}, [], []
    for m in metrics:
        c, s = candidate.get(m), serving.get(m)
        if c is None or s is None:
            verdict = "unmeasured"
        else:
            gain = DIRECTIONS[m] * (c - s)
            tol = 1e-9 * max(1.0, abs(s))
            verdict = "better" if gain > tol else "worse" if gain < -tol else "equal"
        table[m] = {"candidate": c, "serving": s, "verdict": verdict}
        (better if verdict == "better" else worse if verdict == "worse" else []).append(m)
    return (not worse and bool(better)), table


def reasons(table: dict) -> str:
    worse = [
        f"{m} {v['candidate']:.4g} vs {v['serving']:.4g}" for m, v in table.items() if v["verdict"] == "worse"
    ]
    if worse:
        return "worse on " + "; ".join(worse)
    return (
        "no configured metric is better (" + ", ".join(f"{m} {v['verdict']}" for m, v in table.items()) + ")"
    )


def _dashboard(address: str | None) -> str:
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if address:
        return address
    head = cluster.recorded("serve")
    if head is None:
        raise OdysseyError(
            "no serving cluster found: pass --address (its dashboard URL) or deploy with `odyssey serve`"
            + cluster.elsewhere_hint("serve")
        )
    return head.dashboard_url


def serving_path(client, timeout_s: float) -> str:
    """The model path of the running app; an app still deploying (a rollout under way) is waited for."""
    app = (client.get_serve_details().get("applications") or {}).get(launch.APP)
    if not app:
        raise OdysseyError(
            f"no {launch.APP!r} app on this cluster: deploy a first model with `odyssey serve --model DIR` "
            "or `serve deploy`"
        )
    if app.get("status") != "RUNNING":
        launch.wait_running(client, timeout_s)  # raises, with Serve's message, if it fails
        app = client.get_serve_details()["applications"][launch.APP]
    return app["deployed_app_config"]["args"]["model_path"]


def _connect_driver(dashboard: str) -> None:
    """Evaluation runs as Ray tasks: on the local head when that is the one serving, else on the cluster
    RAY_ADDRESS names (inside `ray job submit`), else on an embedded one."""
    head = next(
        (h for r in cluster.ROLES if (h := cluster.recorded(r)) and h.dashboard_url == dashboard), None
    )
    cluster.connect(head.gcs_address if head is not None else None)


def _export_candidate(ckpt: Path) -> Path:
    """RUN/exported/<checkpoint>: exported once; a served model directory is never rewritten."""
    from train.export import export

    dest = ckpt.parent / "exported" / ckpt.name
    if dest.is_dir():
        try:
            if artifact.read_config(dest).get("source_checkpoint") == str(ckpt):
                return dest
        except OdysseyError:
            pass
    return export(ckpt, dest, overwrite=True)


def _wait_for_model(base: str, headers: dict, model_id: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        while True:
            try:
                if http.get("/v1/models").json()["data"][0]["root"] == model_id:
                    return time.monotonic() - t0
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            if time.monotonic() - t0 > timeout_s:
                raise OdysseyError(
                    f"deployed, but {model_id} was not serving after {timeout_s:.0f} s; see the Serve logs"
                )
            time.sleep(0.5)


def _point_config_at(path: Path, model: Path) -> str:
    """Set the file's model_path line to `model`, keeping its comments and layout; or say why not."""
    text = path.read_text(encoding="utf-8")
    lines = re.findall(r"(?m)^[ \t]*model_path:.*$", text)
    if len(lines) != 1:
        return f"not updated ({len(lines)} model_path lines): set model_path to {model} in {path}"
    new = re.sub(
        r"(?m)^([ \t]*model_path:)[ \t]*[^#\n]*?([ \t]*#.*)?$", lambda m: f"{m[1]} {model}{m[2] or ''}", text
    )
    atomic.write_text(path, new)
    return f"{path}: model_path = {model}"


def promote(
    source: str | Path,
    serve_config: str | Path,
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    corpus: str | Path | None = None,
    limit: int | None = None,
    address: str | None = None,
    dry_run: bool = False,
    timeout_s: float = 600,
) -> dict:
    from odyssey.evaluation.runner import evaluate, write_report
    from train import checkpoint
    from train.export import training_corpus

    metrics = check_metrics(list(metrics))
    serve_config = Path(serve_config)
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is first imported, just below
    dashboard = _dashboard(address)
    _connect_driver(dashboard)  # first: connecting to a loopback head sets what Ray reads on import
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard)
    current = Path(serving_path(client, timeout_s))
    ckpt = checkpoint.find(source, best=True)
    candidate = _export_candidate(ckpt)
    config = launch.serve_config(serve_config, candidate, None, [])  # a bad config fails before any eval
    corpus = Path(corpus) if corpus else training_corpus(ckpt)
    record = ckpt.parent / "promotions" / time.strftime("%Y%m%d-%H%M%S")
    if current.resolve() == candidate.resolve():
        return {"promoted": False, "why": f"{candidate} is already serving", "candidate": str(candidate)}

    record.mkdir(parents=True, exist_ok=True)
    log.info("promote: evaluating the candidate %s and the serving model %s", candidate, current)
    # Decided on the validation split: the test split is for reporting (`odyssey eval`), never for choosing.
    settings = answer_settings(serve_config)
    new = evaluate(candidate, corpus, split=DECISION_SPLIT, limit=limit, settings=settings)
    old = evaluate(current, corpus, split=DECISION_SPLIT, limit=limit, settings=settings)
    ok, table = decide(new["metrics"], old["metrics"], metrics)
    write_report(new, record / "candidate")
    write_report(old, record / "serving")
    decision = {
        "promoted": ok and not dry_run,
        "better": ok,
        "candidate": str(candidate),
        "candidate_id": new["model_id"],
        "serving": str(current),
        "serving_id": old["model_id"],
        "checkpoint": str(ckpt),
        "split": DECISION_SPLIT,
        "metrics": table,
        "why": "better: " + ", ".join(m for m, v in table.items() if v["verdict"] == "better")
        if ok
        else reasons(table),
        "record": str(record),
    }
    if ok and not dry_run:
        log.info("promote: rolling out %s", new["model_id"])
        client.deploy_applications(config)
        launch.wait_running(client, timeout_s)
        http = config.get("http_options", {})
        host = http.get("host", "127.0.0.1")
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"
        decision["rollout_s"] = round(
            _wait_for_model(base, launch.client_headers(config), new["model_id"], timeout_s), 1
        )
        decision["serve_config"] = _point_config_at(serve_config, candidate.resolve())
        atomic.write_text(record / "serve.json", json.dumps(config, indent=2) + "\n")
    atomic.write_text(record / "decision.json", json.dumps(decision, indent=2) + "\n")
    return decision
