"""deploy/k8s as shipped: every document validates, strictly (an unknown field fails), against the
newest Kubernetes schema kubernetes_validate carries, and the objects fit together and fit the
daemon: each StatefulSet's headless Service, the flags `embtierd --help` lists and the configuration
the daemon builds from them and the ConfigMap, the gRPC probes, the memory the tiers need, the etcd
members the daemon is pointed at, the unprivileged containers.

There is no Kubernetes here: nothing is applied, and the daemon only prints the configuration it
would run with (`--print-config`)."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from embtier.sizes import parse_bytes

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
DOCUMENTS = [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path != KUSTOMIZATION
             for doc in yaml.safe_load_all(path.read_text()) if doc]
WORKLOADS = [doc for _, doc in DOCUMENTS if doc["kind"] == "StatefulSet"]
# what the downward API gives the variables the manifests use, for a pod embtierd-0 in namespace embtier
FIELDS = {"metadata.name": "embtierd-0", "metadata.namespace": "embtier"}
# the systemd unit's TimeoutStartSec=: the longest recovery the daemon is given
STARTUP_SECONDS = 15 * 60
# after server.grace_seconds, the stop of background workers and the final flush of the log
FLUSH_SECONDS = 30
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
MEMORY_QUANTITY = re.compile(r"([0-9]+)(Ki|Mi|Gi|Ti)")


def find(kind: str, name: str) -> dict:
    (doc,) = [doc for _, doc in DOCUMENTS if (doc["kind"], doc["metadata"]["name"]) == (kind, name)]
    return doc


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def flags(c: dict) -> dict[str, str]:
    """A container's args, each written --flag=value, as flag -> value."""
    assert all(arg.startswith("--") and "=" in arg for arg in c["args"]), c["args"]
    return dict(arg.partition("=")[::2] for arg in c["args"])


def expanded(c: dict, value: str) -> str:
    """value with the $(VAR) references Kubernetes expands from the container's env."""
    env = {e["name"]: e.get("value") or FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c.get("env", ())}
    return VARIABLE.sub(lambda m: env[m.group(1)], value)


def port(c: dict, name: str) -> int:
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return number


def memory_bytes(quantity: str) -> int:
    m = MEMORY_QUANTITY.fullmatch(quantity)
    assert m, f"memory {quantity!r}: written in Ki, Mi, Gi or Ti, as the comments' arithmetic is"
    return int(m.group(1)) << {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[m.group(2)]


def embtierd() -> tuple[dict, dict]:
    sts = find("StatefulSet", "embtierd")
    return sts, container(sts)


def configmap_toml() -> tuple[str, str, str]:
    """(the ConfigMap's name, its key, its TOML text) of the file --config names."""
    sts, c = embtierd()
    config_file = Path(flags(c)["--config"])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_file.parent]
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    name = volume["configMap"]["name"]
    return name, config_file.name, find("ConfigMap", name)["data"][config_file.name]


@functools.cache
def daemon_help() -> str:
    return subprocess.run([sys.executable, "-m", "embtierd", "--help"], check=True, capture_output=True,
                          text=True, timeout=120).stdout


# ---- the schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [doc for _, doc in DOCUMENTS],
                         ids=[f"{file}:{doc['kind']}/{doc['metadata']['name']}" for file, doc in DOCUMENTS])
def test_document_validates_strictly_against_the_newest_kubernetes(doc):
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def misspell_probe(sts: dict) -> None:
    c = container(sts)
    c["readinesProbe"] = c.pop("readinessProbe")


def name_the_grpc_port(sts: dict) -> None:
    container(sts)["startupProbe"]["grpc"]["port"] = "grpc"  # a gRPC probe takes a number only


def quote_replicas(sts: dict) -> None:
    sts["spec"]["replicas"] = "3"


@pytest.mark.parametrize("breakage", [misspell_probe, name_the_grpc_port, quote_replicas])
def test_a_broken_statefulset_is_rejected(breakage):
    broken = copy.deepcopy(embtierd()[0])
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    resources = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert sorted(resources) == sorted({file for file, _ in DOCUMENTS})


# ---- the objects together ------------------------------------------------------------------------


@pytest.mark.parametrize("sts", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_statefulset_is_named_by_a_headless_service_that_selects_its_pods(sts):
    service = find("Service", sts["spec"]["serviceName"])
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = container(sts)
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == {
        p["name"]: p["containerPort"] for p in c["ports"]}


def test_embtierd_service_publishes_only_ready_pods():
    service = find("Service", embtierd()[0]["spec"]["serviceName"])
    assert service["spec"]["publishNotReadyAddresses"] is False


@pytest.mark.parametrize("sts", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_disruption_budget_takes_one_pod_at_a_time(sts):
    budget = find("PodDisruptionBudget", sts["metadata"]["name"])
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == sts["spec"]["selector"]


@pytest.mark.parametrize("sts", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_every_variable_in_the_args_is_set(sts):
    """Kubernetes leaves an unknown $(VAR) in place, silently."""
    c = container(sts)
    env = {e["name"] for e in c.get("env", ())}
    assert {v for arg in c["args"] for v in VARIABLE.findall(arg)} <= env


@pytest.mark.parametrize("sts", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_containers_run_unprivileged(sts):
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = container(sts)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_state_dir_is_the_claimed_volume():
    sts, c = embtierd()
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {Path(m["mountPath"]): m["name"] for m in c["volumeMounts"]}
    assert mounts[Path(flags(c)["--state-dir"])] in claims


def test_metrics_annotation_names_the_metrics_port():
    sts, c = embtierd()
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port(c, "metrics")
    assert flags(c)["--metrics-listen"].rpartition(":")[2] == annotations["prometheus.io/port"]


# ---- embtierd's flags, probes and memory ----------------------------------------------------------


def test_every_flag_is_one_embtierd_help_lists():
    listed = set(re.findall(r"--[a-z0-9][a-z0-9-]*", daemon_help()))
    assert set(flags(embtierd()[1])) - listed == set()


def test_daemon_accepts_the_flags_and_the_configmap(tmp_path):
    """The daemon builds its configuration from the container's args ($(VAR) expanded) and the
    ConfigMap's file, as it would in pod embtierd-0: it listens on the container's ports, keeps its
    state in the claimed volume, advertises its pod's name, and drains within the grace period."""
    sts, c = embtierd()
    _, key, text = configmap_toml()
    (tmp_path / key).write_text(text)
    args = [f"--config={tmp_path / key}" if arg.startswith("--config=") else expanded(c, arg) for arg in c["args"]]
    run = subprocess.run([sys.executable, "-m", "embtierd", *args, "--print-config"], check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cfg = json.loads(run.stdout)
    assert cfg["server"]["listen"] == [f"0.0.0.0:{port(c, 'grpc')}"]
    assert cfg["server"]["metrics_listen"] == f"0.0.0.0:{port(c, 'metrics')}"
    assert cfg["state_dir"] == flags(c)["--state-dir"]
    assert cfg["cluster"]["node_id"] == FIELDS["metadata.name"]
    pod_name, namespace = FIELDS["metadata.name"], FIELDS["metadata.namespace"]
    assert cfg["cluster"]["advertise"] == (f"{pod_name}.{sts['spec']['serviceName']}.{namespace}.svc.cluster.local:"
                                           f"{port(c, 'grpc')}")
    pod = sts["spec"]["template"]["spec"]
    assert cfg["server"]["grace_seconds"] + FLUSH_SECONDS <= pod["terminationGracePeriodSeconds"]


def test_configmap_is_toml():
    _, _, text = configmap_toml()
    assert tomllib.loads(text)["server"]["grace_seconds"] > 0


def test_advertised_address_is_the_pod_dns_name_on_the_grpc_port():
    sts, c = embtierd()
    host, _, advertised_port = flags(c)["--advertise"].rpartition(":")
    assert host == f"$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc.cluster.local"
    assert int(advertised_port) == port(c, "grpc")
    assert expanded(c, flags(c)["--node-id"]) == FIELDS["metadata.name"]


def test_cluster_endpoints_are_the_etcd_members():
    name, _, endpoints = flags(embtierd()[1])["--cluster"].partition("@")
    etcd = find("StatefulSet", "etcd")
    client_port = port(container(etcd), "client")
    assert name
    assert endpoints.split(",") == [f"etcd-{i}.{etcd['spec']['serviceName']}:{client_port}"
                                    for i in range(etcd["spec"]["replicas"])]


def test_probes_ask_the_grpc_health_service_on_the_grpc_port():
    c = embtierd()[1]
    probes = {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: probe["grpc"] for kind, probe in probes.items()} == {kind: {"port": port(c, "grpc")} for kind in probes}
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_SECONDS


def test_memory_holds_the_dram_and_cxl_tiers():
    c = embtierd()[1]
    resources = c["resources"]
    tiers = parse_bytes(flags(c)["--dram-bytes"]) + parse_bytes(flags(c)["--cxl-bytes"])
    assert memory_bytes(resources["limits"]["memory"]) >= tiers
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert float(resources["requests"]["cpu"]) > 0
