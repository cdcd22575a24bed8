"""What can be checked here of deploy/ without building images (no registry for base images):

- nginx: the real `nginx -t` accepts the shipped config (its replicas pointed at loopback);
- Prometheus: the real `promtool check config` accepts the shipped scrape config;
- Helm: the chart renders with Helm's own engine (helm-python-sdk), lints without errors, and
  every rendered object validates against the Kubernetes OpenAPI schema of its kind
  (kubernetes-validate, strict); GPUs follow the tensor-parallel size, readiness is /health,
  the model cache is a volume, and replicas share one Redis;
- compose: parses, each service can start (an image or a build), its mounts and build files
  exist, and nginx and Prometheus name exactly the compose replicas;
- Dockerfiles: the files they copy exist, and they start `steer-server serve`;
- the Grafana dashboard parses and every panel has a query (tests/fleet runs each query
  against a real Prometheus scraping a live server).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml
from fleet_processes import REPO, SHIPPED_NGINX, SHIPPED_PROMETHEUS, binary, nginx_check, nginx_config

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "steer-server"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES_VERSION = "1.30"


def test_nginx_accepts_the_shipped_config(tmp_path):
    config = nginx_config(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], 18080)
    checked = nginx_check(config)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_nginx_check_catches_a_broken_config(tmp_path):
    """The check above can fail: a directive nginx does not know is refused."""
    config = nginx_config(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], 18080)
    snippet = config.parent / "steer-server.conf"
    snippet.write_text(snippet.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    checked = nginx_check(config)
    assert checked.returncode != 0 and "proxy_bufering" in checked.stderr


def test_promtool_accepts_the_shipped_prometheus_config():
    checked = subprocess.run([binary("promtool"), "check", "config", str(SHIPPED_PROMETHEUS)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---------------------------------------------------------------- Helm


def _render(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart with Helm's engine")
    rendered = helm.Chart.load(str(CHART)).render(values, name="fleet", namespace="steer")
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects.extend(o for o in yaml.safe_load_all(text) if o)
    return objects


def _validate(objects: list[dict]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}") from None


def _server(objects: list[dict]) -> dict:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {"deployment": deployment, "container": container, "args": container["args"],
            "volumes": {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}}


def test_helm_chart_lints_without_errors():
    helm = pytest.importorskip("helm_python")
    report = helm.lint(str(CHART))
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] > 1], report  # 1: info


@pytest.mark.parametrize("tensor_parallel", [1, 4])
def test_helm_chart_renders_valid_kubernetes_objects(tensor_parallel):
    objects = _render({"tensorParallelSize": tensor_parallel, "apiKeys": {"existingSecret": "steer-keys"},
                       "quotas": {"existingConfigMap": "steer-quotas"}})
    _validate(objects)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]
    server = _server(objects)
    container, args = server["container"], server["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tensor_parallel
    assert args[args.index("--tensor-parallel-size") + 1] == str(tensor_parallel)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["models"] == "/models" and args[args.index("--model") + 1].startswith("/models/")
    claim = server["volumes"]["models"]["persistentVolumeClaim"]["claimName"]
    assert claim in {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    redis_service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-redis"))
    assert args[args.index("--store") + 1] == f"redis://{redis_service['metadata']['name']}:6379/0"
    assert args[args.index("--api-keys-file") + 1].startswith(mounts["api-keys"] + "/")
    assert args[args.index("--quotas-file") + 1] == mounts["quotas"] + "/quotas"
    assert server["volumes"]["quotas"]["configMap"]["name"] == "steer-quotas"
    service = next(o for o in objects if o["kind"] == "Service" and o is not redis_service)
    pod_labels = server["deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_helm_chart_on_cpu_with_an_external_redis_and_an_existing_model_volume():
    objects = _render({"gpu": {"enabled": False}, "redis": {"enabled": False, "url": "redis://cache:6379/2"},
                       "modelVolume": {"existingClaim": "shared-models"}, "image": {"tag": "cpu"},
                       "model": {"path": ""}})
    _validate(objects)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "Service"]
    server = _server(objects)
    assert "nvidia.com/gpu" not in server["container"]["resources"].get("limits", {})
    assert "--model" not in server["args"]  # the CPU image's embedded model
    assert "--quotas-file" not in server["args"] and "--api-keys-file" not in server["args"]
    assert server["args"][server["args"].index("--store") + 1] == "redis://cache:6379/2"
    assert server["volumes"]["models"]["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_kubernetes_validation_catches_a_missing_field():
    """The validation above can fail: a Deployment without its required selector is refused."""
    objects = _render({})
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    del deployment["spec"]["selector"]
    with pytest.raises(AssertionError, match="selector"):
        _validate([deployment])


# ---------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_can_start():
    services = _compose()["services"]
    assert {"redis", "replica-1", "replica-2", "nginx", "prometheus"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        depends = service.get("depends_on", [])
        assert set(depends) <= services.keys(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), f"{name}: {source}"
            else:
                assert source in _compose()["volumes"], f"{name}: {source}"
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name


def test_compose_replicas_share_redis_and_are_what_nginx_and_prometheus_name():
    services = _compose()["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    for name in replicas:
        command = services[name]["command"]
        assert command[command.index("--store") + 1] == "redis://redis:6379/0"
    upstreams = re.findall(r"^\s*server\s+(\S+?):8000\b", SHIPPED_NGINX.read_text(), re.MULTILINE)
    assert sorted(upstreams) == replicas
    (job,) = yaml.safe_load(SHIPPED_PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"{r}:8000" for r in replicas]


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_serve(dockerfile):
    instructions = []
    for line in re.sub(r"\\\n", " ", (DEPLOY / "docker" / dockerfile).read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    assert instructions[0][0] == "FROM" and ":" in instructions[0][1]  # a pinned base image
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}"
    (entrypoint,) = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint[:2] == ["steer-server", "serve"]
    assert any(keyword == "HEALTHCHECK" and "/health" in rest for keyword, rest in instructions)


def test_cuda_image_installs_the_pinned_vllm():
    text = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    pins = re.findall(r"vllm==([\d.]+)", text)
    pyproject_gpu = re.search(r'gpu = \["vllm==([\d.]+)"\]', (REPO / "pyproject.toml").read_text()).group(1)
    assert pins and set(pins) == {pyproject_gpu}


# ---------------------------------------------------------------- Grafana


def test_grafana_dashboard_parses_and_every_panel_queries():
    dashboard = json.loads((DEPLOY / "grafana" / "steer-server.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("steer_requests_total", "steer_operation_requests_total", "steer_rejected_requests_total",
                   "steer_vector_cache_hits_total", "steer_capture_seconds_bucket", "vllm:request_success_total"):
        assert metric in exprs
