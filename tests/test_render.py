"""`render` and the worker command line: golden manifests per topology, and the rules behind them (pure, no cluster)."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mmgraph_contract.graph import parse
from mmgraph_contract.rules import problems
from mmgraph_contract.settings import worker_command
from mmgraph_contract.vocabulary import StageName
from mmgraph_operator.render import InvalidGraph, KubeVersion, render

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
# every graph under examples/ (examples/cluster/ holds the cluster's graphs beside their PersistentVolume)
EXAMPLES = [path for path in sorted((REPO / "examples").rglob("*.yaml")) if "kind: MultimodalGraph" in path.read_text()]


def example_id(path: Path) -> str:
    return "-".join(path.relative_to(REPO / "examples").with_suffix("").parts)


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / name).read_text())


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
@pytest.mark.parametrize("kube", ["1.20", "1.29"])
def test_render_matches_golden(example: Path, kube: str):
    """Pins the exact manifests; regenerate deliberately with MMGRAPH_UPDATE_GOLDEN=1 and review the diff."""
    body = yaml.safe_load(example.read_text())
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    text = yaml.safe_dump_all(render(parse(body), kube), sort_keys=False, width=120)
    golden = GOLDEN / f"{example_id(example)}-{kube}.yaml"
    if os.environ.get("MMGRAPH_UPDATE_GOLDEN"):  # deliberate: print what changes, for review
        old = golden.read_text() if golden.exists() else ""
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(golden), "rendered", lineterm="")
        print("\n".join(diff))
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("example", EXAMPLES, ids=example_id)
def test_rendered_manifests_validate_strictly_against_kubernetes_schemas(example: Path):
    for manifest in render(parse(yaml.safe_load(example.read_text())), "1.29"):
        kubernetes_validate.validate(manifest, "1.29.0", strict=True)


def test_render_is_pure_and_deterministic():
    body = load("qwen2.5-vl-e-p-d.yaml")
    before = copy.deepcopy(body)
    assert render(parse(body)) == render(parse(body))
    assert body == before


@pytest.mark.parametrize(
    ("topology", "stages", "api"),
    [
        ("agg", {"frontend", "pd"}, "pd"),
        ("e-pd", {"frontend", "encoder", "pd"}, "frontend"),
        ("e-p-d", {"frontend", "encoder", "pd", "decode"}, "frontend"),
    ],
)
def test_each_topology_renders_exactly_its_stages(topology: str, stages: set[str], api: str):
    """A Deployment per stage, but agg's frontend, which runs in pd's pods (the frontend Service selects them)."""
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["topology"] = topology
    body["spec"]["stages"] = {s: v for s, v in body["spec"]["stages"].items() if s in stages}
    manifests = render(parse(body))
    deployments = {m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"}
    assert deployments == {f"qwen-vl-{s}" for s in stages if s != "frontend" or api == "frontend"}
    services = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "Service"}
    assert services.keys() == {f"qwen-vl-{s}" for s in stages}
    assert services["qwen-vl-frontend"]["selector"] == {"mmgraph.io/graph": "qwen-vl", "mmgraph.io/stage": api}
    assert services["qwen-vl-frontend"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    pd = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "qwen-vl-pd")
    assert ("--openai" in pd["spec"]["template"]["spec"]["containers"][0]["args"]) == (api == "pd")


def test_pdb_api_version_follows_the_server():
    body = load("qwen2.5-vl-e-p-d.yaml")
    versions = {
        v: {m["apiVersion"] for m in render(parse(body), v) if m["kind"] == "PodDisruptionBudget"}
        for v in ("1.20", "v1.21.3", "1.30+")
    }
    assert versions == {"1.20": {"policy/v1beta1"}, "v1.21.3": {"policy/v1"}, "1.30+": {"policy/v1"}}
    assert KubeVersion.parse("v1.27.1-gke.100") >= (1, 27)


def test_gpus_become_requests_limits_and_tensor_parallelism():
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["stages"]["pd"]["gpus"] = 4
    body["spec"]["stages"]["pd"]["resources"] = {"limits": {"memory": "64Gi"}}
    pd = next(m for m in render(parse(body)) if m["metadata"]["name"] == "qwen-vl-pd" and m["kind"] == "Deployment")
    container = pd["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "4"},
        "requests": {"nvidia.com/gpu": "4"},
    }
    assert "--engine-arg=--tensor-parallel-size=4" in container["args"]


def test_model_sources_become_volumes_or_flags():
    pvc = next(
        m for m in render(parse(load("llava-agg.yaml"))) if m["kind"] == "Deployment" and "pd" in m["metadata"]["name"]
    )
    pod = pvc["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "model-cache", "readOnly": True}} in pod["volumes"]
    assert "--model=/models/llava-hf/llava-1.5-7b-hf" in pod["containers"][0]["args"]
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["model"]["huggingFace"]["tokenSecret"] = {"name": "hf", "key": "token"}
    dep = next(m for m in render(parse(body)) if m["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env


def test_pods_are_non_root_and_read_only():
    for m in render(parse(load("qwen2.5-vl-e-p-d.yaml"))):
        if m["kind"] == "Deployment":
            pod = m["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["automountServiceAccountToken"] is False  # no worker calls the Kubernetes API
            c = pod["containers"][0]["securityContext"]
            assert (
                c["readOnlyRootFilesystem"]
                and not c["allowPrivilegeEscalation"]
                and c["capabilities"] == {"drop": ["ALL"]}
            )


@pytest.mark.parametrize(
    ("topology", "readers"),
    [
        ("agg", {"pd": set()}),
        ("e-pd", {"encoder": {"pd"}, "pd": set()}),
        ("e-p-d", {"encoder": {"pd"}, "pd": {"decode"}, "decode": set()}),
    ],
)
def test_network_policies_admit_only_the_stages_that_call(topology: str, readers: dict[str, set[str]]):
    """Structure only: the test API server has no network plugin that enforces NetworkPolicies. Anyone reaches
    the HTTP port of the pods that serve the API (agg: pd's); the frontend reaches each worker's HTTP port; the
    stage that reads over NIXL reaches any port (UCX's are ephemeral)."""
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["topology"] = topology
    body["spec"]["stages"] = {k: v for k, v in body["spec"]["stages"].items() if k in ("frontend", *readers)}
    policies = {m["metadata"]["name"]: m["spec"] for m in render(parse(body)) if m["kind"] == "NetworkPolicy"}
    api = "pd" if topology == "agg" else "frontend"
    assert set(policies) == {f"qwen-vl-{s}" for s in (api, *readers)}
    assert policies[f"qwen-vl-{api}"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    http = [{"port": "http", "protocol": "TCP"}]
    for stage, expected in readers.items():
        if stage == api:
            continue
        spec = policies[f"qwen-vl-{stage}"]
        assert spec["podSelector"]["matchLabels"] == {"mmgraph.io/graph": "qwen-vl", "mmgraph.io/stage": stage}
        assert spec["policyTypes"] == ["Ingress"]
        front, *rest, scrape = spec["ingress"]
        assert front == {
            "from": [{"podSelector": {"matchLabels": {"mmgraph.io/graph": "qwen-vl", "mmgraph.io/stage": "frontend"}}}],
            "ports": http,
        }
        admitted = {peer["podSelector"]["matchLabels"]["mmgraph.io/stage"] for rule in rest for peer in rule["from"]}
        assert admitted == expected and all("ports" not in rule for rule in rest)
        monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}  # the default scrapers
        assert scrape == {"from": [{"namespaceSelector": monitoring}], "ports": http}  # /metrics is on http


def test_the_scrape_rule_follows_spec_network_policy_scrape_from():
    """The pods' prometheus.io annotations invite a scrape of /metrics on the HTTP port: the namespaces
    scrapeFrom selects may make it; null leaves no rule beyond the graph's own edges."""
    body = load("qwen2.5-vl-e-p-d.yaml")
    selector = {"matchExpressions": [{"key": "team", "operator": "In", "values": ["observability"]}]}
    for scrape_from, rule in ((selector, [{"namespaceSelector": selector}]), (None, None)):
        body["spec"]["networkPolicy"] = {"scrapeFrom": scrape_from}
        policy = next(
            m for m in render(parse(body)) if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] == "qwen-vl-pd"
        )
        scrapes = [r["from"] for r in policy["spec"]["ingress"] if any("namespaceSelector" in p for p in r["from"])]
        assert scrapes == ([rule] if rule else [])


def test_invalid_graph_raises_with_every_problem():
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["topology"] = "agg"
    body["spec"]["model"]["path"] = "/models/x"
    with pytest.raises(InvalidGraph) as info:
        render(parse(body))
    assert len(info.value.problems) == 3  # encoder and decode not in agg, two model sources
    assert problems(parse(load("tiny-e-p-d.yaml"))) == []


def test_worker_command_is_shared_by_render_and_local_runs():
    graph = parse(load("tiny-e-p-d.yaml"))
    peers = {
        StageName.ENCODER: "http://127.0.0.1:9001",
        StageName.PD: "http://127.0.0.1:9002",
        StageName.DECODE: "http://127.0.0.1:9003",
    }
    argv = worker_command(
        graph.spec, StageName.FRONTEND, model="/m", host="127.0.0.1", advertise_host="127.0.0.1", peers=peers
    )
    assert argv[:2] == ["worker", "frontend"]
    assert "--encoder-url=http://127.0.0.1:9001" in argv and "--allowed-schemes=https,http,data" in argv
    decode = worker_command(
        graph.spec, StageName.DECODE, model="/m", host="127.0.0.1", advertise_host="127.0.0.1", peers={}
    )
    assert "--kv-role=consumer" in decode and "--engine-arg=--enforce-eager" in decode
    assert "--engine-arg=--block-size=32" in decode


@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (1, "cuda")])
def test_the_encoder_runs_on_the_device_its_stage_has(gpus, device):
    body = load("tiny-e-p-d.yaml")
    body["spec"]["stages"]["encoder"]["gpus"] = gpus
    argv = worker_command(
        parse(body).spec, StageName.ENCODER, model="/m", host="0.0.0.0", advertise_host="10.0.0.1", peers={}
    )
    assert [a for a in argv if a.startswith("--device")] == [f"--device={device}"]


def test_every_rule_is_checked_whatever_else_is_wrong():
    """A bad name does not hide the GPU/parallelism mismatch of an engine (each rule runs on its own)."""
    body = load("tiny-e-p-d.yaml")
    body["metadata"]["name"] = "Not_A_Label"
    body["spec"]["stages"]["pd"].update(gpus=2, engineArgs={"tensor-parallel-size": 4})
    found = problems(parse(body))
    assert any("metadata.name" in p for p in found)
    assert any("spec.stages.pd.gpus is 2 but its engineArgs ask for 4 GPUs" in p for p in found)


@pytest.mark.parametrize(("topology", "fetching"), [("agg", {"pd"}), ("e-pd", {"encoder"}), ("e-p-d", {"encoder"})])
def test_every_stage_that_fetches_media_gets_the_graphs_media_policy(topology, fetching):
    """The frontend checks URLs against spec.media; the stage that then fetches and decodes them (agg: pd) must
    apply the same policy, not the defaults (found by a hand review of the agg golden)."""
    body = load("tiny-e-p-d.yaml")
    body["spec"]["topology"] = topology
    body["spec"]["media"] = {"allowedSchemes": ["https", "http"], "maxPixels": 1234}
    for stage in {"agg": ("encoder", "decode"), "e-pd": ("decode",), "e-p-d": ()}[topology]:
        del body["spec"]["stages"][stage]
    spec = parse(body).spec
    for stage in spec.used_stages():
        argv = worker_command(spec, stage, model="/m", host="0.0.0.0", advertise_host="10.0.0.1", peers={})
        has_policy = {"--allowed-schemes=https,http", "--max-pixels=1234"} <= set(argv)
        assert has_policy == (stage.value in fetching or stage == StageName.FRONTEND), (stage, argv)


def _autoscaled(**autoscaling) -> dict:
    body = load("qwen2.5-vl-e-p-d.yaml")
    body["spec"]["stages"]["pd"]["autoscaling"] = {"maxReplicas": 4, **autoscaling}
    return body


@pytest.mark.parametrize(("kube", "api_version"), [("1.20", "autoscaling/v2beta2"), ("1.29", "autoscaling/v2")])
def test_an_autoscaled_stage_gets_an_hpa_on_its_own_series_and_no_replicas(kube, api_version):
    """The Deployment leaves replicas to the HPA; the PodDisruptionBudget follows the spec's maxReplicas (never the
    live count); the HPA steers a Pods metric the stage exports, in the version the server has."""
    out = {(m["kind"], m["metadata"]["name"]): m for m in render(parse(_autoscaled(metric="running")), kube)}
    assert "replicas" not in out[("Deployment", "qwen-vl-pd")]["spec"]
    assert ("PodDisruptionBudget", "qwen-vl-pd") in out
    hpa = out[("HorizontalPodAutoscaler", "qwen-vl-pd")]
    assert hpa["apiVersion"] == api_version
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "qwen-vl-pd"},
        "minReplicas": 1,
        "maxReplicas": 4,
        "metrics": [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "vllm_num_requests_running"},
                    "target": {"type": "AverageValue", "averageValue": "4"},
                },
            }
        ],
    }
    if kube == "1.29":  # kubernetes-validate has no 1.20 schemas; the real 1.20 API server takes v2beta2 (test_hpa)
        for manifest in out.values():
            kubernetes_validate.validate(manifest, "1.29.0", strict=True)
    one = {(m["kind"], m["metadata"]["name"]) for m in render(parse(_autoscaled(maxReplicas=1)), kube)}
    assert ("PodDisruptionBudget", "qwen-vl-pd") not in one  # at most one pod: nothing to keep up during a drain


def test_autoscaling_that_cannot_work_is_refused_with_what_to_change():
    body = _autoscaled(minReplicas=5)
    body["spec"]["stages"]["encoder"]["autoscaling"] = {"maxReplicas": 3, "metric": "running"}
    found = problems(parse(body))
    assert "spec.stages.pd.autoscaling: minReplicas 5 is above maxReplicas 4" in found
    assert "spec.stages.encoder.autoscaling.metric: the encoder stage exports no 'running' series; use waiting" in found
    agg = load("llava-agg.yaml")
    agg["spec"]["stages"].setdefault("frontend", {})["autoscaling"] = {"maxReplicas": 3, "metric": "running"}
    assert problems(parse(agg)) == [
        "spec.stages.frontend.autoscaling: in agg the API runs in pd's pods; autoscale pd instead"
    ]


def test_a_pod_monitor_scrapes_every_stage_when_asked():
    body = load("qwen2.5-vl-e-p-d.yaml")
    assert not [m for m in render(parse(body)) if m["kind"] == "PodMonitor"]  # off by default
    body["spec"]["monitoring"] = {"podMonitor": True, "labels": {"release": "kps"}, "interval": "15s"}
    out = render(parse(body))
    (monitor,) = [m for m in out if m["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    selected = monitor["spec"]["selector"]["matchLabels"]
    deployments = [m for m in out if m["kind"] == "Deployment"]
    assert len(deployments) == 4
    for deployment in deployments:  # every stage's pods, each with the port the monitor names
        pod = deployment["spec"]["template"]
        assert selected.items() <= pod["metadata"]["labels"].items()
        assert "http" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        ({"trust_remote-code": True}, "engineArgs.trust-remote-code runs code from the model repository"),
        ({"tensor_parallel-size": 4}, "spec.stages.pd.gpus is 2 but its engineArgs ask for 4 GPUs"),
        ({"Port": 1}, None),  # not a spelling: another key, left to vLLM
        ({"served_model-name": "x"}, "engineArgs.served-model-name is set by the operator"),
    ],
    ids=["remote-code", "parallelism", "case-is-not-spelling", "reserved"],
)
def test_every_rule_reads_an_engine_argument_under_one_spelling(args, refusal):
    """`trust_remote-code` renders `--trust-remote-code`: the rules must see it under that name, whatever mix of
    dashes and underscores it was written with (it used to pass every rule and still render the flag)."""
    body = load("tiny-e-p-d.yaml")
    body["spec"]["stages"]["pd"].update(gpus=2, engineArgs=args)
    found = problems(parse(body))
    if refusal is None:
        assert not [p for p in found if "engineArgs" in p], found
    else:
        assert any(refusal in p for p in found), found


def test_two_spellings_of_one_engine_argument_are_refused():
    body = load("tiny-e-p-d.yaml")
    body["spec"]["stages"]["pd"]["engineArgs"] = {"max-model-len": 512, "max_model_len": 1024}
    with pytest.raises(Exception, match="engineArgs names max-model-len twice"):
        parse(body)
