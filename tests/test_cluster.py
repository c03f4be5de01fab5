"""The shipped cluster files and command lines work as written.

- Every shipped command line that starts a run (cluster/rayjob.yaml's entrypoint, cluster/submit.sh's usage example,
  the README's fenced bash commands, the Makefile's smoke lines) goes through real shell word expansion with the
  programs stubbed, and the resulting argv through i2v's own CLI parsers and `load_config` (no training).
- cluster/ray-cluster.yaml passes Ray's own launcher validation (offline); cluster/rayjob.yaml matches KubeRay's
  ray.io/v1 RayJob fields (tests/schemas/kuberay-rayjob-v1.schema.json, see its $comment for the source commits).
- `cluster/submit.sh` submits a tiny `i2v train` job to the local head of the `ray_cluster` fixture, which succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from i2v.config import ConfigError, ExperimentCfg

STUBS = ("i2v", "python", "python3", "ray")  # programs replaced by argv recorders
# A synopsis, not a runnable command: optional [brackets] or an upper-case placeholder.
PLACEHOLDER = re.compile(r"\s\[[-\w]|\b(CONFIG|RUN_DIR|DIR|HEAD_DASHBOARD_URL)\b")
RUN = re.compile(r"\b(i2v train|i2v tune|i2v\.cli train|tune\.sweep|cluster/submit\.sh)\b")


# ----------------------------------------------------------------------------------------------------------------------
# Shipped command lines


def readme_commands() -> list[str]:
    """Runnable commands of the README's ```bash blocks that start a run (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if RUN.search(ln.split("#")[0]) and not PLACEHOLDER.search(ln.split("#")[0])]


def makefile_commands() -> list[str]:
    recipes = re.findall(r"^\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    return [ln.replace("$(BIN)/", "") for ln in recipes if " train " in ln]


def submit_usage_commands() -> list[str]:
    usage = re.findall(r"^#\s+(cluster/submit\.sh .*)$", (ROOT / "cluster/submit.sh").read_text(), flags=re.M)
    return [ln for ln in usage if not PLACEHOLDER.search(ln)]


def rayjob_commands() -> list[str]:
    """What KubeRay's submitter runs under `bash -ce`: `ray job submit --address ... -- ENTRYPOINT`."""
    spec = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())["spec"]
    return [f"ray job submit --address http://head-svc:8265 -- {spec['entrypoint']}"]


def shell_calls(line: str, tmp_path: Path) -> list[list[str]]:
    """Runs `line` in bash from the repository root with i2v/python/ray stubbed; returns their argv, in call order."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(parents=True)
    calls.mkdir()
    for name in STUBS:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\nprintf "%s\\0" {name} "$@" > "$(mktemp "$I2V_CALLS/$(date +%s%N).XXXX")"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "I2V_CALLS": str(calls)}
    subprocess.run(["bash", "-ce", line + "\nwait"], cwd=ROOT, env=env, check=True, timeout=30)
    return [f.read_text().split("\0")[:-1] for f in sorted(calls.iterdir())]


def job_argv(entrypoint: list[str]) -> list[str]:
    """The argv of a Ray job's driver: `ray job submit` joins its words with shlex.join and the job supervisor runs
    the string with /bin/sh (subprocess shell=True)."""
    script = f'exec {shlex.quote(sys.executable)} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
    out = subprocess.run(["/bin/sh", "-c", script + shlex.join(entrypoint)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class Parsed(Exception):
    """Raised by the stubbed training/sweep entry points with the config the CLI built."""


def parse_run(argv: list[str], monkeypatch) -> ExperimentCfg:
    """Parses a run's argv with i2v's (or tune.sweep's) own parser and load_config, stopping before any training."""
    import i2v.train.driver
    from i2v.cli import main as i2v_main
    from tune.sweep import main as sweep_main

    def stop(cfg, *args, **kwargs):
        raise Parsed(cfg)

    monkeypatch.setattr(i2v.train.driver, "run_training", stop)
    monkeypatch.setattr(i2v.train.driver, "validate", stop)  # the sweep's first step after load_config
    prog, args = argv[0], argv[1:]
    if prog in ("python", "python3"):
        assert args[0] == "-m", argv
        prog, args = args[1], args[2:]
    main = sweep_main if prog == "tune.sweep" else i2v_main
    if prog in ("i2v", "i2v.cli") and args[0] == "tune":
        main, args = sweep_main, args[1:]
    assert prog in ("i2v", "i2v.cli", "tune.sweep"), argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(args)
    except Parsed as e:
        return e.args[0]
    raise ConfigError(f"exit status {rc}: {err.getvalue().strip()}")  # the CLI reported the error and returned


@pytest.mark.parametrize(
    "source, commands",
    [
        ("cluster/rayjob.yaml", rayjob_commands),
        ("cluster/submit.sh", submit_usage_commands),
        ("README.md", readme_commands),
        ("Makefile", makefile_commands),
    ],
)
def test_shipped_command_lines_give_each_override_once(source, commands, tmp_path, monkeypatch):
    lines = commands()
    assert lines, f"{source}: no command line found"
    for n, line in enumerate(lines):
        for call in shell_calls(line, tmp_path / str(n)):
            if call[:3] == ["ray", "job", "submit"]:
                call = job_argv(call[call.index("--") + 1 :])
            elif call[0] == "ray":
                continue  # ray up / ray dashboard
            words = [w for w in call if "=" in w and not w.startswith("-")]
            # An unquoted brace pattern arrives as one override per shard.
            assert not [w for w in words if re.search(r"shard-\d+\.tar$", w)], f"{source}: {line}\n-> {call}"
            try:
                cfg = parse_run(call, monkeypatch)
            except ConfigError as e:
                pytest.fail(f"{source}: {line}\n-> {call}\n{e}")
            for shards in (cfg.data.train_shards, cfg.data.val_shards):
                # a single .tar where a pattern was meant: a brace pattern the shell expanded (a glob is fine)
                pattern = "{" in shards or any(c in shards for c in "*?[")
                assert pattern or not shards.endswith(".tar"), f"{source}: {line}: {shards}"


def test_the_check_catches_an_unquoted_shard_pattern(tmp_path, monkeypatch):
    line = "i2v train configs/smoke.yaml data.train_shards=/d/shard-{000000..000003}.tar --out /tmp/x"
    (call,) = shell_calls(line, tmp_path)
    assert len([w for w in call if w.startswith("data.train_shards=")]) == 4
    with pytest.raises(ConfigError, match="data.train_shards: given twice"):
        parse_run(call, monkeypatch)
    quoted = line.replace("data.train_shards=/d/shard-{000000..000003}.tar", "'data.train_shards=/d/shard-{0..3}.tar'")
    (call,) = shell_calls(quoted, tmp_path / "q")
    assert parse_run(call, monkeypatch).data.train_shards == "/d/shard-{0..3}.tar"


# ----------------------------------------------------------------------------------------------------------------------
# Cluster launcher YAML


def launcher_config() -> dict:
    """cluster/ray-cluster.yaml as `ray up` sees it before any cloud call: defaults filled, docker checked, then
    Ray's schema (ray/autoscaler/ray-schema.json) and its cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text()))
    validate_config(config)
    return config


def test_launcher_yaml_passes_rays_validation_and_runs_py311_in_a_container():
    config = launcher_config()
    image = config["docker"]["image"]
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-(gpu|cu\d+)", image), image  # Ray 2.60, Python 3.11, CUDA
    assert config["file_mounts"]["~/i2v"] == "."
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_launcher_head_alone_offers_the_tune_driver_resource():
    """Sweep trial drivers ask for a sliver of tune.sweep.DRIVER_RESOURCE when a node declares it: only the on-demand
    head may, so drivers never take a GPU worker's CPU (or die with a spot node)."""
    from tune.sweep import DRIVER_RESOURCE

    types = launcher_config()["available_node_types"]
    offering = sorted(name for name, t in types.items() if t.get("resources", {}).get(DRIVER_RESOURCE, 0) > 0)
    assert offering == ["head"]


def test_launcher_rsync_excludes_are_anchored_and_keep_the_code(tmp_path):
    """rsync semantics: a pattern without a leading "/" matches a name at any depth ("data" would also drop
    i2v/data/, code). Each pattern is anchored or says so with "**/"; where rsync is installed, the launcher's own
    excludes run on a copy of the tree: i2v/data/ arrives, /data does not."""
    excludes = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())["rsync_exclude"]
    assert [e for e in excludes if not e.startswith(("/", "**/"))] == []
    if shutil.which("rsync") is None:
        return
    src, dst = tmp_path / "src", tmp_path / "dst"
    for path in ("i2v/data/__init__.py", "data/synth/train/shard-000000.tar", "runs/x/summary.json", "README.md"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text("x")
    subprocess.run(["rsync", "-a", *[f"--exclude={e}" for e in excludes], f"{src}/", str(dst)], check=True)
    assert (dst / "i2v/data/__init__.py").is_file() and (dst / "README.md").is_file()
    assert not (dst / "data").exists() and not (dst / "runs").exists()


def test_launcher_mounts_shared_storage_on_every_node():
    config = launcher_config()
    init = " ".join(config["initialization_commands"])  # on the host, before the container starts
    assert "mount -t nfs4" in init and "/mnt/efs" in init
    assert "-v /mnt/efs:/mnt/efs" in config["docker"]["run_options"]
    # Until the file system id is set, `ray up` stops with a message naming it (run here with the id unset).
    out = subprocess.run(["bash", "-c", init], capture_output=True, text=True)
    assert out.returncode != 0 and "set EFS_ID" in out.stderr


# ----------------------------------------------------------------------------------------------------------------------
# KubeRay RayJob manifest


def cpu(q: str | int) -> float:
    return float(q[:-1]) / 1000 if isinstance(q, str) and q.endswith("m") else float(q)


def test_rayjob_matches_the_kuberay_v1_fields_and_requests_what_fits():
    import jsonschema

    schema = json.loads((ROOT / "tests/schemas/kuberay-rayjob-v1.schema.json").read_text())
    job = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())
    jsonschema.validate(job, schema)
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])  # a YAML string, parsed by the submitter
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in pods:
        for c in group["template"]["spec"]["containers"]:
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(req), f"{c['name']}: requests without cpu/memory"
            assert cpu(req["cpu"]) <= cpu(lim["cpu"])
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    # p4d.24xlarge: 96 vCPUs of capacity; allocatable is less (kubelet, system reserve, daemon sets).
    assert cpu(worker["requests"]["cpu"]) <= 96 - 4


def test_the_schema_rejects_what_kubernetes_would():
    import jsonschema

    schema = json.loads((ROOT / "tests/schemas/kuberay-rayjob-v1.schema.json").read_text())
    job = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())
    bad = [
        ("spec", "runtimeEnv", "x"),  # the v1alpha1 field; v1 has runtimeEnvYAML
        ("spec", "submissionMode", "Pod"),
        ("spec", "ttlSecondsAfterFinished", "600"),
    ]
    for *path, key, value in bad:
        broken = json.loads(json.dumps(job))
        node = broken
        for p in path:
            node = node[p]
        node[key] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(job))
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # map[string]string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ----------------------------------------------------------------------------------------------------------------------
# `ray job submit` end to end


@pytest.mark.timeout(300)
def test_submit_sh_runs_a_tiny_training_job_on_a_local_head(ray_cluster, tmp_path):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    from i2v.data.synth import make_synthetic

    shards = make_synthetic(
        tmp_path / "synth", classes=("move_right", "move_left"), train=32, val=16, frames=8, size=32, shard_samples=16
    )
    address = f"http://{ray._private.worker.global_worker.node.webui_url}"  # the fixture's head and dashboard
    run_dir = tmp_path / "runs" / "job"
    overrides = [
        f"data.train_shards={shards.train}",  # brace patterns, passed through submit.sh, ray job submit and /bin/sh
        f"data.val_shards={shards.val}",
        "data.num_workers=0",
        "backbone.partition=replicate",
        "train.num_workers=1",
        "train.epochs=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", "cluster/submit.sh", address, "configs/smoke.yaml", str(run_dir), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    client = JobSubmissionClient(address)
    (job,) = [j for j in client.list_jobs() if (j.submission_id or "").startswith("i2v-job-")]
    assert job.status == JobStatus.SUCCEEDED, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epoch"] == 1 and 0.0 <= summary["val_top1"] <= 1.0
    # Both shards were trained on: one epoch is one pass over the 2 x 16 clips (batch 8 on one worker).
    assert summary["steps"] == 32 // 8


def test_flag_defaults_and_sweep_layers_may_be_replaced_once(monkeypatch):
    """Keys a command fills in itself sit under the user's: `--set` replaces a describe flag, `--trial-set` a `--set`
    key; within one list a key is still given once."""
    import i2v.describe
    from i2v.cli import main as i2v_main

    def stop(cfg, *args, **kwargs):
        raise Parsed(cfg)

    monkeypatch.setattr(i2v.describe, "describe", stop)
    with pytest.raises(Parsed) as e:
        i2v_main(["describe", "--method", "linear_probe", "--frames", "8", "--set", "data.frames=16"])
    assert e.value.args[0].data.frames == 16
    smoke = str(ROOT / "configs/smoke.yaml")
    sweep = ["python", "-m", "tune.sweep", smoke, "--space", "bottleneck", "--set", "train.epochs=30", "train.lr=1e-4"]
    cfg = parse_run([*sweep, "--trial-set", "train.epochs=3"], monkeypatch)
    assert (cfg.train.epochs, cfg.train.lr) == (3, 1e-4)
    with pytest.raises(ConfigError, match="train.epochs: given twice"):
        parse_run([*sweep, "train.epochs=3"], monkeypatch)
