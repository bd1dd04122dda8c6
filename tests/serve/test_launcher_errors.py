"""`python -m dfastllm_ray.serve run CONFIG` on a bad config: a config that does not read or
validate exits 2 before any cluster starts, naming the field; an app whose first deploy fails
(a missing checkpoint folder) exits 1 with the replica's error line, instead of sleeping
forever as `serve run` does."""
from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from app_process import kill_group, log_tail, tiny_app
from serve_testutil import ROOT, tiny_config

from dfastllm_ray.serve import launcher


def write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


def edited(edit):
    cfg = copy.deepcopy(tiny_config())
    edit(cfg)
    return cfg


@pytest.mark.parametrize("cfg,words", [
    (edited(lambda c: c["applications"][0]["args"]["models"][0].update(modle_source="x")),
     "application 'dfastllm' args:\nmodels[tiny-llada].modle_source: unknown field (did you "
     "mean 'model_source'?)"),
    (edited(lambda c: c["applications"][0].update(rout_prefix="/")),
     "applications[dfastllm].rout_prefix: unknown field (did you mean 'route_prefix'?)"),
    (edited(lambda c: c["http_options"].update(port="eighty")),
     "http_options.port='eighty': Input should be a valid integer"),
    ("applications: [\n", "cannot read it"),
])
def test_a_bad_config_is_refused_before_any_cluster_starts(tmp_path, cfg, words):
    problem = launcher.config_problem(write(tmp_path, cfg))
    assert problem is not None and words in problem


def test_main_exits_2_naming_the_problem(tmp_path, caplog):
    path = write(tmp_path, edited(
        lambda c: c["applications"][0]["args"]["models"][0]["engine"].update(max_num_seq=4)))
    assert launcher.main(["run", path]) == 2
    assert "models[tiny-llada].engine.max_num_seq: unknown field (did you mean " \
           "'max_num_seqs'?)" in caplog.text
    assert launcher.config_problem(str(tmp_path / "absent.yaml")).startswith("cannot read it")


def test_the_shipped_configs_have_no_problem():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert launcher.config_problem(str(path)) is None, path


def status(**apps):
    return SimpleNamespace(applications={
        name: SimpleNamespace(status=st, message=msg, deployments=deps)
        for name, (st, msg, deps) in apps.items()})


def test_only_a_first_deploy_failure_stops_the_launcher(monkeypatch):
    trace = "Traceback (most recent call last):\n  File x\nFileNotFoundError: model='m': gone\n"
    dep = SimpleNamespace(status="DEPLOY_FAILED", message=trace)
    failed = status(a=("DEPLOY_FAILED", "Failed to update the deployments ['R'].", {"R": dep}))
    monkeypatch.setattr("ray.serve.status", lambda: failed)
    why = launcher.first_deploy_failure(["a"], set())
    assert why.splitlines()[:2] == [
        "application 'a' failed to deploy: Failed to update the deployments ['R'].",
        "  R: FileNotFoundError: model='m': gone"]
    # an app that ran once and then fails is a replica loss Serve recovers from
    assert launcher.first_deploy_failure(["a"], {"a"}) is None
    ran: set = set()
    monkeypatch.setattr("ray.serve.status", lambda: status(a=("RUNNING", "", {})))
    assert launcher.first_deploy_failure(["a", "not-yet"], ran) is None and ran == {"a"}


def test_last_exception_line():
    assert launcher.last_exception("x\nValueError: bad\n  more\n") == "ValueError: bad"
    assert launcher.last_exception("no exception here\nsecond") == "no exception here"
    assert launcher.last_exception("") == ""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fresh_cluster
def test_a_missing_checkpoint_folder_exits_1_with_its_error(tmp_path):
    path, _, env = tiny_app(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    for model in cfg["applications"][0]["args"]["models"]:
        model["model_source"] = str(tmp_path / "no-such-folder")
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        assert proc.wait(timeout=240) == 1, log_tail(log_path)
    finally:
        kill_group(proc)
    text = log_path.read_text(errors="replace")
    assert "application 'dfastllm' failed to deploy" in text, log_tail(log_path)
    assert "FileNotFoundError: model=" in text and "no such checkpoint folder" in text
