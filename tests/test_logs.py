"""What `odyssey.logs` turns down, and what it leaves: the libraries' routine notices go, their warnings
and errors and everybody else's lines stay (the whole demo's log: test_pipeline.py)."""

from __future__ import annotations

import logging
import os
import re
import sys
import types

from odyssey import logs


def test_ray_data_chatter_is_hidden_from_the_console_and_nothing_else(caplog):
    logs.quiet()
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("✔️  Dataset train_lm_0 execution finished in 0.00 seconds")
        logger.info("⚠️  Dataset train_lm_0 execution failed")
        logger.error("Dataset train_lm_0 execution finished in 1 s, then crashed")
    hidden = {r.getMessage(): getattr(r, "hide", False) for r in caplog.records}
    assert hidden == {
        "✔️  Dataset train_lm_0 execution finished in 0.00 seconds": True,  # kept in Ray Data's log file
        "⚠️  Dataset train_lm_0 execution failed": False,
        "Dataset train_lm_0 execution finished in 1 s, then crashed": False,  # errors always show
    }


def test_muted_drops_only_the_named_modules_prints(capsys):
    chatty = types.ModuleType("chatty")
    exec("def build():\n    print('DeepSpeed op built successfully')\n", chatty.__dict__)
    sys.modules["chatty"] = chatty
    try:
        with logs.muted("chatty"):
            chatty.build()
            print("ours")
        chatty.build()
    finally:
        del sys.modules["chatty"]
    assert capsys.readouterr().out.splitlines() == ["ours", "DeepSpeed op built successfully"]


def test_the_driver_drops_rays_preemption_watcher_line_and_keeps_the_users_pattern(monkeypatch):
    monkeypatch.setenv(logs.DEDUP_SKIP_ENV, "my noise")
    logs.quiet_driver()
    pattern = re.compile(os.environ[logs.DEDUP_SKIP_ENV])
    line = (
        "[2026-11-29 08:31:36,793 E 2889 2920] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: 'bff1958eed70e05df607e09901000000' has constructor arguments in the "
        "object store and max_restarts > 0. If the arguments ..."
    )
    assert pattern.search(line) and pattern.search("my noise here")
    assert not pattern.search("core_worker.cc: Actor with class name: 'TrainWorker' died unexpectedly")
