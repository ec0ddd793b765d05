"""deploy/: every config parses, names only what exists, and carries what its consumer requires."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from loraplex.serving.metrics import DEFINITIONS
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
pytest.importorskip("ray", reason="Ray Serve is part of the dev setup (make test)")


def app_args_are_accepted(app: dict, tmp_path) -> None:
    """The app builder itself validates its args (unknown keys raise); build without starting Ray.
    A key file path is swapped for a real key file made by `loraplex keys add`, and a base on a
    cluster volume for the embedded base (relative paths are the repo's own, as `serve run` sees them)."""
    from loraplex.serving.app import build_app
    from loraplex.serving.auth import add_key
    from loraplex.training.base import EMBEDDED_BASE_DIR

    assert app["import_path"] == "loraplex.serving.app:build_app"
    args = dict(app.get("args") or {})
    assert args.get("base_model"), "the app needs a base_model"
    if args["base_model"].startswith("/"):
        args["base_model"] = str(EMBEDDED_BASE_DIR)
    else:
        assert (REPO / args["base_model"] / "config.json").is_file()
    if "api_keys" in args:
        add_key(tmp_path / "keys.yaml", "acme", ["acme-*"])
        args["api_keys"] = str(tmp_path / "keys.yaml")
    build_app(args)


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_vllm.yaml"])
def test_serve_configs_name_real_servicers_and_valid_app_args(name, tmp_path):
    config = yaml.safe_load((DEPLOY / name).read_text())
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "loraplex.serving.grpc_servicer.add_servicer_to_server"
    ]
    from loraplex.serving.grpc_servicer import add_servicer_to_server  # noqa: F401  the proxy imports it by name

    for app in config["applications"]:
        app_args_are_accepted(app, tmp_path)


def test_rayservice_carries_what_kuberay_requires(tmp_path):
    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService" and service["metadata"]["name"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    app_args_are_accepted(app, tmp_path)
    (deployment,) = app["deployments"]
    from loraplex.serving.app import ModelServer

    assert deployment["name"] == ModelServer.name  # overrides must name a real deployment
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0

    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    (container,) = head["template"]["spec"]["containers"]
    assert container["image"] and container["resources"]["requests"] and container["resources"]["limits"]
    assert container["readinessProbe"]["grpc"]["port"] == serve["grpc_options"]["port"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        worker = group["template"]["spec"]["containers"][0]
        assert worker["image"] and worker["resources"]["requests"]
    # the key file the app reads is a mounted Secret on every pod (the Router may run on any),
    # and the base is a volume on every pod (a replica may run on any)
    for spec in [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        secrets = {v["name"] for v in spec["volumes"] if "secret" in v}
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] in secrets}
        assert any(app["args"]["api_keys"].startswith(m + "/") for m in mounts)
        all_mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert app["args"]["base_model"] in all_mounts


def test_prometheus_scrapes_the_ray_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    serve_port = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"][0]["args"]["metrics_port"]
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets and all(t.endswith(f":{serve_port}") for t in targets)


def test_grafana_dashboard_covers_every_per_adapter_metric_and_names_only_real_ones():
    dashboard = json.loads((DEPLOY / "grafana" / "loraplex-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_(loraplex_\w+)", e)}
    known = set()
    for name, (kind, *_rest) in DEFINITIONS.items():
        known |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
    assert used <= known, used - known
    per_adapter = {name for name, (_, _, labels, _) in DEFINITIONS.items() if "adapter" in labels}
    covered = {m.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for m in used}
    assert per_adapter <= covered, per_adapter - covered


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_serve(name):
    lines = (DEPLOY / name).read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies and all((REPO / src).exists() for sources in copies for src in sources)
    assert {"8000", "9000"} <= {p for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd[4:])[:2] == ["loraplex", "serve"]
