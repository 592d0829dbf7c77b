"""The Ray cluster launcher configs at the repository root: ``cluster.yaml`` (AWS, GPU spot workers)
and ``cluster_onprem.yaml`` (the ``local`` provider).

They are validated the way ``ray up`` validates them before touching a machine: Ray's own
``prepare_config`` (merges the provider's defaults) then ``validate_config`` (Ray's JSON schema, which
refuses unknown keys at the top level and in ``auth``, ``docker`` and each node type). Neither needs
network access or AWS credentials. Both live in ``ray.autoscaler._private.util``, a private API: this
file is written against ray 2.60 and skips, with the reason, when that import fails.

Where Ray's schema accepts anything (the keys of ``provider`` and of an AWS ``node_config``), the test
checks the keys against the names the schema lists for ``provider`` and against EC2's RunInstances
parameters, so a misspelt key fails there too.

The docker image's Ray version must equal the installed Ray's major.minor: the project's
``pip install`` keeps the image's Ray (pyproject asks for ray[tune]>=2.40), so the image decides the
cluster's Ray, and the Ray that runs ``ray up`` / ``ray job submit`` must match it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ray_util = pytest.importorskip(
    "ray.autoscaler._private.util",
    reason="Ray's cluster-config validation (private API, tested against ray 2.60) is not importable",
)
jsonschema = pytest.importorskip("jsonschema", reason="Ray's config validation needs jsonschema")

import click  # noqa: E402  (a dependency of ray[default], raised by Ray's CLI checks)
import ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster_onprem.yaml"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
PROVIDER_KEYS = set(SCHEMA["properties"]["provider"]["properties"])
# Parameters of EC2 RunInstances (boto3 create_instances), what Ray passes an AWS node_config as.
EC2_RUN_INSTANCES_KEYS = {
    "AdditionalInfo", "BlockDeviceMappings", "CapacityReservationSpecification", "ClientToken",
    "CpuOptions", "CreditSpecification", "DisableApiStop", "DisableApiTermination", "DryRun",
    "EbsOptimized", "ElasticGpuSpecification", "ElasticInferenceAccelerators", "EnablePrimaryIpv6",
    "EnclaveOptions", "HibernationOptions", "IamInstanceProfile", "ImageId",
    "InstanceInitiatedShutdownBehavior", "InstanceMarketOptions", "InstanceType", "Ipv6AddressCount",
    "Ipv6Addresses", "KernelId", "KeyName", "LaunchTemplate", "LicenseSpecifications",
    "MaintenanceOptions", "MaxCount", "MetadataOptions", "MinCount", "Monitoring",
    "NetworkInterfaces", "NetworkPerformanceOptions", "Operator", "Placement", "PrivateDnsNameOptions",
    "PrivateIpAddress", "RamdiskId", "SecurityGroupIds", "SecurityGroups", "SubnetId",
    "TagSpecifications", "UserData",
}  # fmt: skip
# Members of the nested RunInstances structures the configs use.
EC2_NESTED_KEYS = {
    "BlockDeviceMappings": {"DeviceName", "Ebs", "NoDevice", "VirtualName"},
    "Ebs": {"DeleteOnTermination", "Encrypted", "Iops", "KmsKeyId", "OutpostArn", "SnapshotId",
            "Throughput", "VolumeSize", "VolumeType"},
    "InstanceMarketOptions": {"MarketType", "SpotOptions"},
    "SpotOptions": {"BlockDurationMinutes", "InstanceInterruptionBehavior", "MaxPrice",
                    "SpotInstanceType", "ValidUntil"},
    "IamInstanceProfile": {"Arn", "Name"},
}  # fmt: skip
PYPROJECT = (ROOT / "pyproject.toml").read_text()
# How Ray says no: schema errors, ValueError/KeyError/assert in prepare_config, click errors in its CLI.
REFUSED = (jsonschema.ValidationError, ValueError, KeyError, AssertionError, click.ClickException)
IMAGE = re.compile(r"^rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+|cpu)$")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def ray_validate(config: dict) -> None:
    """What ``ray up`` does to a config before it talks to a provider; raises when Ray refuses it."""
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    for key in prepared["provider"]:
        if key not in PROVIDER_KEYS:
            raise ValueError(f"unknown provider key {key!r}")
    if prepared["provider"]["type"] == "aws":
        for node_type in prepared["available_node_types"].values():
            for label, mapping in ec2_dicts(node_type["node_config"]):
                known = EC2_RUN_INSTANCES_KEYS if label == "node_config" else EC2_NESTED_KEYS.get(label)
                unknown = set(mapping) - known if known else set()  # structures not listed: unchecked
                if unknown:
                    raise ValueError(f"unknown EC2 keys {sorted(unknown)} in {label}")


def ec2_dicts(node_config: dict, label: str = "node_config"):
    """(structure name, dict) for an AWS node_config and the RunInstances structures inside it."""
    yield label, node_config
    for key, value in node_config.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                yield from ec2_dicts(item, key)


def dicts_with_checked_keys(config: dict):
    """(label, dict) for every mapping whose keys are checked: Ray's strict ones and ours."""
    yield "top level", config
    for section in ("auth", "docker", "provider"):
        if section in config:
            yield section, config[section]
    for name, node_type in config.get("available_node_types", {}).items():
        yield name, node_type
        if config["provider"]["type"] == "aws":
            for i, (label, mapping) in enumerate(ec2_dicts(node_type["node_config"])):
                yield f"{name}.{label}.{i}", mapping


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_config(name):
    ray_validate(load(name))


@pytest.mark.parametrize("name", CONFIGS)
def test_a_misspelt_key_is_refused(name):
    config = load(name)
    checked = 0
    for label, mapping in list(dicts_with_checked_keys(config)):
        for key in list(mapping):
            bad = copy.deepcopy(config)
            target = dict(dicts_with_checked_keys(bad))[label]
            target[key[:-1]] = target.pop(key)  # drop the last letter: 'max_workers' -> 'max_worker'
            with pytest.raises(REFUSED):
                ray_validate(bad)
            checked += 1
    assert checked > 20


def test_an_unknown_key_is_refused_with_its_name():
    config = load("cluster.yaml")
    config["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        ray_validate(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_docker_image_matches_the_installed_ray_and_python(name):
    docker = load(name)["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    requires = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', PYPROJECT, re.M)
    low = (int(requires[1]), int(requires[2]))
    assert images
    for image in images:
        m = IMAGE.match(image)
        assert m, f"{image!r} is not a rayproject/ray:<x.y.z>-py<3NN>-<gpu|cuNNN|cpu> tag"
        assert m.group(1, 2) == tuple(ray.__version__.split(".")[:2]), (
            f"{name}: image {image} vs installed ray {ray.__version__}: move both to the same release"
        )
        assert (int(m.group(4)), int(m.group(5))) >= low, f"{image}: pyproject requires Python >= {low}"


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_commands_install_the_synced_repository(name):
    config = load(name)
    repo_mounts = {
        remote for remote, local in config["file_mounts"].items() if (ROOT / local).resolve() == ROOT
    }
    assert repo_mounts, "file_mounts must sync the repository root"
    installs = [
        c for c in config["setup_commands"]
        if re.search(r"\bpip install (-e )?(\S+)$", c) and c.split()[-1] in repo_mounts
    ]  # fmt: skip
    assert installs, f"setup_commands {config['setup_commands']} do not pip-install {sorted(repo_mounts)}"
    assert re.search(r'^name = "dfq_search"$', PYPROJECT, re.M), "the repository root is not the project"


@pytest.mark.parametrize("name", CONFIGS)
def test_no_path_of_this_machine(name):
    text = (ROOT / name).read_text()
    assert str(ROOT) not in text and str(Path.home()) not in text
    for local in load(name)["file_mounts"].values():
        assert not Path(local).is_absolute() and not local.startswith("~"), local


def test_aws_gpu_workers_scale_from_zero_on_spot():
    config = load("cluster.yaml")
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    head = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    assert gpu, "no worker type advertises a GPU: the autoscaler would never start one for a GPU trial"
    assert all(v["min_workers"] == 0 for v in gpu)
    assert all(v["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for v in gpu)
    assert prepared["available_node_types"][head]["resources"].get("GPU", 0) == 0
    assert 0 < prepared["idle_timeout_minutes"] <= 60
