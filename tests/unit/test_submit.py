"""`pipeline.submit` without a cluster: argument checks, what gets uploaded, auth headers."""
from __future__ import annotations

import argparse
import zipfile

import pytest

from pipeline import submit
from pipeline.submit import SubmitError, add_submit_arguments, submit_job


def _uploaded_names(project, config, tmp_path) -> tuple[str, list[str]]:
    """(config argument, files in the zip Ray would upload)."""
    from ray._private.runtime_env.packaging import _zip_files  # what working_dir upload runs
    with submit._upload_dir(project, config) as (upload_dir, config_arg):
        out = tmp_path / "pkg.zip"
        _zip_files(str(upload_dir), submit.UPLOAD_EXCLUDES, str(out), include_gitignore=True)
    return config_arg, sorted(zipfile.ZipFile(out).namelist())


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    for path in ["jobs/run.py", "jobs/configs/example.yaml", "pipeline/cli.py", "tests/test_x.py",
                 ".venv/bin/python", "runs/demo/shard.arrow", "benchmarks/.cache/x", "benchmarks/bench.py"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    return root


def test_upload_has_code_and_outside_config_but_no_local_state(project, tmp_path):
    outside = tmp_path / "my.yaml"
    outside.write_text("name: mine\n")
    config_arg, names = _uploaded_names(project, outside, tmp_path)
    assert config_arg == "_submitted/my.yaml"
    assert names == ["_submitted/my.yaml", "benchmarks/bench.py", "jobs/configs/example.yaml",
                     "jobs/run.py", "pipeline/cli.py"]
    assert not project.joinpath("_submitted").exists()  # the project tree is left alone


def test_config_inside_project_keeps_its_path(project, tmp_path):
    config_arg, names = _uploaded_names(project, project / "jobs/configs/example.yaml", tmp_path)
    assert config_arg == "jobs/configs/example.yaml"
    assert not any(n.startswith("_submitted") for n in names)


@pytest.mark.parametrize("kwargs, message", [
    (dict(config_path="missing.yaml"), "config file not found: missing.yaml"),
    (dict(overrides=["run_dir"]), "expected key=value"),
    (dict(runtime_env_extra={"working_dir": "."}), "may not set working_dir"),
])
def test_user_errors_are_named_before_connecting(project, kwargs, message):
    args = dict(address="http://127.0.0.1:1", config_path=str(project / "jobs/configs/example.yaml"),
                overrides=[], project_root=project) | kwargs
    with pytest.raises(SubmitError, match=message):
        submit_job(**args)


def test_unreachable_cluster_is_a_clear_error(project):
    with pytest.raises(SubmitError, match="cannot reach the Ray Jobs API at http://127.0.0.1:1"):
        submit_job(address="http://127.0.0.1:1", config_path=str(project / "jobs/configs/example.yaml"),
                   overrides=[], project_root=project)


def test_token_from_env_or_files_becomes_a_bearer_header(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit._auth_headers() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-file")
    assert submit._auth_headers() == {"Authorization": "Bearer default-file"}
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert submit._auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit._auth_headers() == {"Authorization": "Bearer from-env"}


def test_cli_arguments(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    parser = add_submit_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["c.yaml", "--set", "a=1", "--set", "b=2", "--no-wait"])
    assert (args.config, args.overrides, args.wait, args.job_id) == ("c.yaml", ["a=1", "b=2"], False, None)
    assert args.address == "http://127.0.0.1:8265" and args.func is submit.main


def test_runtime_env_extra_reaches_the_job(project, monkeypatch):
    """env_vars (e.g. an S3 endpoint and keys for the job) and excludes are merged into the runtime_env."""
    submitted = {}

    class FakeClient:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            return "raysubmit_fake"

    monkeypatch.setattr(submit, "_connect", lambda address: FakeClient())
    env_vars = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k"}
    code = submit_job(address="http://127.0.0.1:1", config_path=str(project / "jobs/configs/example.yaml"),
                      overrides=["run_dir=s3://bucket/runs/x"], wait=False, project_root=project,
                      runtime_env_extra={"env_vars": env_vars, "excludes": ["*.arrow"]})
    assert code == 0
    assert submitted["entrypoint"] == "python -m jobs.run jobs/configs/example.yaml --set run_dir=s3://bucket/runs/x"
    runtime_env = submitted["runtime_env"]
    assert runtime_env["env_vars"] == env_vars
    assert runtime_env["excludes"] == submit.UPLOAD_EXCLUDES + ["*.arrow"]
