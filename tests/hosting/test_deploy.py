"""deploy/: the `ray up` configs pass Ray's own cluster-config validation, the KubeRay manifests are what
they claim, and every `paramserver ...` command in deploy/ uses only flags the CLI has.

Ray's validation is the code path `ray up` runs (ray.autoscaler._private.commands._bootstrap_config):
`prepare_config` (defaults merged from the provider's defaults.yaml, local-provider preparation, node-type
min/max) then `validate_config` (the bundled ray-schema.json plus its cross-field checks). The cloud
steps that follow it for AWS (instance-type lookup, IAM, subnets, security groups: boto calls) are not
run: nothing here touches the network. For the local provider the whole `_bootstrap_config` runs, since
its provider steps make no calls.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before anything imports ray (as conftest.py does)

import contextlib
import copy
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:  # PyYAML comes with ray; without it only the text checks run
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML (installed with ray) is needed to parse deploy/")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RAY_UP_CONFIGS = ["aws-gpu.yaml", "onprem.yaml"]
KUBERAY = DEPLOY / "kuberay"
FRONT_DOOR_PORT = 50051

# The command line's contract for cluster deployments (paramserver serve / status / stop). status and
# stop also take --auth-token-env: every deployment here turns the bearer token on, and without it they
# would be refused. Deploy files must stay inside this list AND inside what the CLI really parses.
CLI_FLAGS = {
    "serve": {
        "--ray-address", "--shards", "--gpus-per-shard", "--host", "--port",
        "--trusted-module", "--auth-token-env", "--placement", "--shard-port-base",
    },
    "status": {"--address", "--job", "--auth-token-env"},
    "stop": {"--address", "--auth-token-env"},
}
PLACEMENTS = {"SPREAD", "STRICT_SPREAD"}

# `paramserver <subcommand>` up to the end of that shell command (a separator, a redirection, a single
# quote or backtick that closes the string or inline code span around it, a comment, the end of the line).
COMMAND = re.compile(r"\bparamserver\s+(serve|status|stop)\b([^;&|<>`'#\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
SUBSHELL = re.compile(r"\$\([^)]*\)")  # $(...) is a value, not flags


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _strings(node):
    """Every string in a parsed YAML document (folded block scalars arrive as one line)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _texts(path: Path, raw: bool = True) -> list[str]:
    """The file's text (comments included) with shell line continuations joined, and, for YAML, every
    string value (a folded command whole); `raw=False`: for YAML only the string values."""
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml") or yaml is None:
        return [text.replace("\\\n", " ")]
    values = [s.replace("\\\n", " ") for doc in yaml.safe_load_all(text) for s in _strings(doc)]
    return ([text.replace("\\\n", " ")] if raw else []) + values


def paramserver_commands(path: Path, raw: bool = True) -> list[tuple[str, str]]:
    """(subcommand, the rest of the command) for every `paramserver serve|status|stop` in the file."""
    return [
        (m.group(1), " ".join(SUBSHELL.sub("X", m.group(2)).split()))
        for text in _texts(path, raw)
        for m in COMMAND.finditer(text)
    ]


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the `ray up` configs, by Ray's own code


@pytest.fixture(scope="module")
def ray_util():
    if yaml is None:
        pytest.skip("PyYAML (installed with ray) is needed to read the configs")
    pytest.importorskip("ray", reason="ray is needed to validate the `ray up` configs")
    pytest.importorskip("jsonschema", reason="ray's config validation needs jsonschema")
    from ray.autoscaler._private import util

    return util


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_config_passes_ray_validation(ray_util, name):
    config = _load(DEPLOY / name)
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    # Our commands survive the merge with the provider's defaults.
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == config[key], key
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_onprem_config_passes_ray_up_bootstrap(ray_util):
    """The local provider's bootstrap makes no calls: run the whole of what `ray up` runs before SSH."""
    from ray.autoscaler._private.commands import _bootstrap_config

    config = _load(DEPLOY / "onprem.yaml")
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    (node_type,) = resolved["available_node_types"].values()
    workers = len(config["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == workers


def test_ray_validation_is_live(ray_util):
    """The validator does refuse: a misspelt top-level key and a bad resource type are errors."""
    import jsonschema

    config = ray_util.prepare_config(_load(DEPLOY / "aws-gpu.yaml"))
    misspelt = copy.deepcopy(config)
    misspelt["head_start_commands"] = misspelt.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        ray_util.validate_config(misspelt)
    fractional = copy.deepcopy(config)
    fractional["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        ray_util.validate_config(fractional)


@needs_yaml
def test_aws_config_shape():
    config = _load(DEPLOY / "aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= FRONT_DOOR_PORT <= r["ToPort"] and r["IpProtocol"] == "tcp" for r in rules)


@needs_yaml
@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_config_installs_and_starts_the_service(name):
    config = _load(DEPLOY / name)
    setup = " ; ".join(
        config.get("setup_commands", []) + config.get("head_setup_commands", []) + config.get("worker_setup_commands", [])
    )
    assert re.search(r"pip install torch==[\d.]+ ", setup), "torch goes first"
    assert "pip install \"paramserver" in setup
    start = " ".join(config["head_start_ray_commands"])
    assert start.index("ray start --head") < start.index("paramserver serve"), "Ray first, then the service"
    assert re.search(r"nohup bash -c 'until paramserver serve [^']*' .*&", start), "in the background, restarted"
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


# ---------------------------------------------------------------- KubeRay


@needs_yaml
def test_raycluster_manifest():
    docs = [d for d in yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    cluster, service = by_kind["RayCluster"], by_kind["Service"]
    assert cluster["apiVersion"] == "ray.io/v1" and service["apiVersion"] == "v1"

    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert FRONT_DOOR_PORT in [p["containerPort"] for p in head["ports"]]
    hook = " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
    assert "paramserver serve" in hook

    (group,) = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    # The Service selects the head pod of this cluster and exposes the front door.
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    (port,) = service["spec"]["ports"]
    assert port["port"] == FRONT_DOOR_PORT
    named = {p.get("name"): p["containerPort"] for p in head["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == FRONT_DOOR_PORT


@needs_yaml
def test_the_direct_route_ports_are_the_shard_port_base_ones():
    """Every start of the service fixes the shards' ports (--shard-port-base B, 2 shards: B..B+1); the AWS
    security group opens them (the front door's rule alone is the relay route) and the KubeRay worker pods
    name them."""
    bases = set()
    for name in ["aws-gpu.yaml", "onprem.yaml", "kuberay/raycluster.yaml"]:
        for sub, rest in paramserver_commands(DEPLOY / name, raw=False):
            if sub == "serve" and "--shards" in rest:
                bases.add(int(re.search(r"--shard-port-base (\d+)", rest).group(1)))
    (base,) = bases
    rules = _load(DEPLOY / "aws-gpu.yaml")["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] == base and r["ToPort"] == base + 1 for r in rules)
    docs = [d for d in yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()) if d]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in worker["ports"]] == [base, base + 1]
    assert f"{base}" in (DEPLOY / "README.md").read_text()


@needs_yaml
def test_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((KUBERAY / "rayjob.yaml").read_text()) if d]
    (job,) = docs
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.match(r"python -m workers\.demos\.train --ray-address auto --service \S+:%d\b" % FRONT_DOOR_PORT, job["spec"]["entrypoint"])
    cluster = _load_all_kind(KUBERAY / "raycluster.yaml", "RayCluster")
    service = _load_all_kind(KUBERAY / "raycluster.yaml", "Service")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert f"--service {service['metadata']['name']}:{FRONT_DOOR_PORT}" in job["spec"]["entrypoint"]


def _load_all_kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]
    return doc


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\S+", text, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    assert re.search(rf"^EXPOSE .*\b{FRONT_DOOR_PORT}\b", text, re.M)
    assert text.index("pip install --no-cache-dir \"torch==") < text.index('pip install --no-cache-dir ".[demo]"')


# ---------------------------------------------------------------- the CLI contract, in every deploy file


def test_every_deploy_file_is_checked():
    names = {str(p.relative_to(DEPLOY)) for p in deploy_files()}
    assert {"aws-gpu.yaml", "onprem.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "Dockerfile", "README.md"} <= names
    # and the scanner finds the service's start command in each place that starts it
    for name in ["aws-gpu.yaml", "onprem.yaml", "kuberay/raycluster.yaml", "README.md"]:
        assert any(sub == "serve" for sub, _ in paramserver_commands(DEPLOY / name)), name


def _check_cli(commands: list[tuple[str, str]], where: str) -> None:
    for sub, rest in commands:
        unknown = set(FLAG.findall(rest)) - CLI_FLAGS[sub]
        assert not unknown, f"{where}: `paramserver {sub}` has no {sorted(unknown)}: {rest}"
        for value in re.findall(r"--placement[= ]+([A-Z_]+)\b", rest):
            assert value in PLACEMENTS, f"{where}: --placement {value}"


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_paramserver_commands_use_only_cli_flags(path):
    _check_cli(paramserver_commands(path), path.name)


def _parsed_flags(sub: str) -> set[str]:
    """The flags `paramserver <sub>` really takes, from its --help (nothing is started)."""
    cli = pytest.importorskip("paramserver.__main__")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([sub, "--help"])
    return set(FLAG.findall(out.getvalue())) - {"--help"}


@pytest.mark.parametrize("sub", sorted(CLI_FLAGS))
def test_contract_is_inside_the_real_cli(sub):
    """The CLI parses every flag of the contract, so the deploy files' commands run as written."""
    missing = CLI_FLAGS[sub] - _parsed_flags(sub)
    assert not missing, f"`paramserver {sub}` no longer takes {sorted(missing)}: deploy/ must follow"


@needs_yaml
def test_shell_commands_parse():
    """Every command the configs run is valid bash (`bash -n`: parsed, not run)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    commands = []
    for name in RAY_UP_CONFIGS:
        config = _load(DEPLOY / name)
        for key, value in config.items():
            if key.endswith("_commands"):
                commands += [(name, key, c) for c in value]
    cluster = _load_all_kind(KUBERAY / "raycluster.yaml", "RayCluster")
    hook = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["/bin/bash", "-c"]
    commands.append(("raycluster.yaml", "postStart", hook[2]))
    inner = re.compile(r"bash -c '([^']*)'")
    for name, key, command in list(commands):
        commands += [(name, key + " (inner)", c) for c in inner.findall(command)]
    for name, key, command in commands:
        result = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{name} {key}: {command}\n{result.stderr}"


@needs_yaml
def test_service_start_commands_bind_the_front_door():
    """Where a config starts the service: Ray's address `auto`, every interface, port 50051."""
    for name in ["aws-gpu.yaml", "onprem.yaml", "kuberay/raycluster.yaml"]:
        serves = [rest for sub, rest in paramserver_commands(DEPLOY / name, raw=False) if sub == "serve"]
        assert serves, name
        for line in serves:
            assert "--ray-address auto" in line and "--host 0.0.0.0" in line, (name, line)
            assert f"--port {FRONT_DOOR_PORT}" in line and "--shards" in line, (name, line)


def test_flag_scanner_catches_drift():
    sample = (
        "nohup paramserver serve --ray-address auto --shards 2 --tls-cert c.pem --port 50051 > log &\n"
        "`paramserver status --address \"$(ray get-head-ip --x):50051\" --job a --verbose` and --not-this\n"
        "paramserver serve --placement PACK\n"
    )
    commands = [(m.group(1), " ".join(SUBSHELL.sub("X", m.group(2)).split())) for m in COMMAND.finditer(sample)]
    assert [sub for sub, _ in commands] == ["serve", "status", "serve"]
    for bad, expected in zip(commands, ["--tls-cert", "--verbose", "PACK"]):
        with pytest.raises(AssertionError, match=expected):
            _check_cli([bad], "sample")


def _trainer_flags(module: str) -> set[str] | None:
    source = ROOT / "workers" / "demos" / f"{module}.py"
    if not source.exists():
        return None
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", source.read_text()))


@pytest.mark.parametrize("module", ["external_trainer", "train"])
def test_trainer_commands_use_the_trainers_flags(module):
    """`python -m workers.demos.<trainer>` in deploy/ only with flags its argparse defines (when it exists)."""
    known = _trainer_flags(module)
    if known is None:
        pytest.skip(f"workers/demos/{module}.py is not there yet")
    pattern = re.compile(rf"python -m workers\.demos\.{module}\b([^;&|<>`\n']*)")
    for path in deploy_files():
        for text in _texts(path):
            for match in pattern.finditer(text):
                used = set(FLAG.findall(SUBSHELL.sub("X", match.group(1))))
                assert used <= known | {"--help"}, f"{path.name}: workers.demos.{module} has no {used - known}"
