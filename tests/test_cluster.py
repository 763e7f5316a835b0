"""`lvb compile --cluster` on a real Ray cluster of CPU-limited nodes on loopback, with the
real tpu-mlir on every node. One cluster serves the module (Ray starts slowly); each test
adds the node it needs. The compile itself runs as its own process, as a user runs it,
so that a test can take a node away under it. The whole-object-store path is tested;
--cluster-shared-dir differs only in where a task reads and writes, and is tried by hand."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import bmodel_digest, manifest, record_as_exported
from lvb.bmodel import inspect_bmodel
from lvb.compile.cluster import SCRATCH_PREFIX
from lvb.toolchain import find_toolchain

# Ray's start-up and every compile take minutes; the nodes run tpu-mlir.
pytestmark = [pytest.mark.toolchain, pytest.mark.slow]
NAME = "mha-cross-first"  # the smallest fixture: 17 nets
SCRATCH = re.compile(rf"{SCRATCH_PREFIX}\d+-(\w+)-\w{{8}}")  # tempfile.mkdtemp's suffix: 8 of [a-z0-9_]
NODE = {"num_cpus": 1, "object_store_memory": 150 << 20, "memory": 4 << 30}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


def start_compile(work, cluster, *extra):
    return subprocess.Popen([sys.executable, "-m", "lvb.cli", "compile", "--work", str(work), "--quant", "int4",
                             "--cluster", cluster.address, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def copy_export(export_factory, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(export_factory(NAME) / "export", work / "export")
    return work


def tool_running_on(node) -> Path | None:
    """The job scratch folder (SCRATCH_PREFIX<pid>-<net>-<8 chars>) of a tpu-mlir tool running on
    this node: its tool server (under the node's raylet) has a child working in it."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for process in raylet.children(recursive=True):
        try:
            if "lvb.compile.toolserver" in " ".join(process.cmdline()):
                for child in process.children():
                    cwd = Path(child.cwd())
                    folder = next((p for p in (cwd, *cwd.parents) if SCRATCH.fullmatch(p.name)), None)
                    if folder is not None:
                        return folder
        except psutil.Error:
            continue
    return None


def compile_beside_a_node(cluster, export_factory, tmp_path, env: dict):
    """A compile while a node with `env` is in the cluster: (that node, the compile's work dir,
    its error lines, its stderr)."""
    node = cluster.add_node(**NODE, env_vars=env)
    try:
        work = copy_export(export_factory, tmp_path)
        out, err = start_compile(work, cluster).communicate(timeout=300)
    finally:
        cluster.remove_node(node)
    return node, work, [line for line in err.splitlines() if line.startswith("error:")], err


def test_a_node_without_the_toolchain_stops_the_compile_naming_it(cluster, export_factory, tmp_path):
    broken, work, lines, err = compile_beside_a_node(cluster, export_factory, tmp_path,
                                                     {"LVB_TOOLCHAIN": str(tmp_path / "no-toolchain")})
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"({broken.node_id[:8]})" in lines[0] and "no-toolchain holds no model_transform.py" in lines[0], lines[0]
    assert not list(work.glob("*.bmodel")) and not list((work / "compile").glob("*/*/result.json"))


def test_a_node_with_another_tpu_mlir_version_stops_the_compile_naming_it(cluster, export_factory, tmp_path):
    """The node's toolchain reports tpu-mlir 0.0.1 (a distribution record first on its
    PYTHONPATH): refused before any job, as cache keys include the version."""
    import os

    site = tmp_path / "site"
    (site / "tpu_mlir-0.0.1.dist-info").mkdir(parents=True)
    (site / "tpu_mlir-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tpu_mlir\nVersion: 0.0.1\n")
    tools = tmp_path / "old-toolchain"
    tools.mkdir()
    (tools / "model_transform.py").touch()
    env = {"LVB_TOOLCHAIN": str(tools), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    other, work, lines, err = compile_beside_a_node(cluster, export_factory, tmp_path, env)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"({other.node_id[:8]})" in lines[0] and "has tpu-mlir 0.0.1, the command's has " in lines[0], lines[0]
    assert not list(work.glob("*.bmodel")) and not list((work / "compile").glob("*/*/result.json"))


def test_files_travel_in_32_mb_pieces(cluster, tmp_path):
    """A file over the piece size goes into the object store as 32 MB pieces (the README's
    figure) and a node writes the same bytes back from them."""
    import numpy as np

    from lvb.compile.cluster import CHUNK, ClusterSettings, RayExecutor, receive

    assert CHUNK == 32 * 2**20
    data = np.random.default_rng(0).integers(0, 256, 2 * CHUNK + 12345, dtype=np.uint8).tobytes()
    (tmp_path / "weights.bin").write_bytes(data)
    executor = RayExecutor(ClusterSettings(cluster.address))
    try:
        pieces = [executor.ray.get(ref) for ref in executor.upload(tmp_path / "weights.bin")]
        assert [len(p) for p in pieces] == [CHUNK, CHUNK, 12345]
        (tmp_path / "node").mkdir()
        receive([("weights.bin", len(pieces))], pieces, tmp_path / "node")
    finally:
        executor.close()
    assert (tmp_path / "node" / "weights.bin").read_bytes() == data


def test_a_net_larger_than_any_node_is_an_error_up_front(cluster, export_factory, tmp_path):
    """A net whose memory need (its kind's measured peak scaled by its files' bytes) is over the
    largest node's Ray memory stops the compile before any job: a sparse file in its export
    folder, recorded as exported, makes it 400 MB of weights (a staged prefill net: about 5 GB)."""
    work = copy_export(export_factory, tmp_path)
    net = next(n for n, e in json.loads((work / "export" / "manifest.json").read_text())["nets"].items()
               if e["kind"] == "self_prefill")
    with open(work / "export" / net / "padding.bin", "wb") as f:
        f.truncate(400 << 20)
    record_as_exported(work, net)
    out, err = start_compile(work, cluster).communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    offered = NODE["memory"] / 1e9
    assert f"{net} needs " in lines[0] and f"the largest node of the cluster offers {offered:.1f} GB" in lines[0], lines[0]
    assert not list((work / "compile").glob("*/*/result.json"))


def test_a_net_that_fails_is_named_and_not_run_again(cluster, export_factory, tmp_path):
    work = copy_export(export_factory, tmp_path)
    first = next(iter(json.loads((work / "export" / "manifest.json").read_text())["nets"]))  # fails before the rest run
    broken = work / "export" / first / f"{first}.onnx"
    broken.write_bytes(broken.read_bytes()[:1000])
    record_as_exported(work, first)  # a net tpu-mlir fails on (an unrecorded change is refused up front: test_hostile)
    out, err = start_compile(work, cluster, "--check", "none").communicate(timeout=600)
    assert f"error: {first}: model_transform.py failed" in err, err
    # The tool's own log came back from the node, with exactly one run of the tool in it.
    log = (work / "compile" / "logs" / f"{first}.log").read_text()
    assert log.count("$ model_transform.py") == 1 and "Traceback" in log
    assert not list(work.glob("*.bmodel"))


def test_compiles_through_a_lost_node_to_the_local_pools_bmodel(cluster, compile_factory, export_factory, tmp_path):
    local = compile_factory(NAME, "int4")
    work = copy_export(export_factory, tmp_path)
    worker = cluster.add_node(**NODE)
    process = start_compile(work, cluster, "--check", "none")
    deadline = time.time() + 600
    while not (lost := tool_running_on(worker)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None and lost, process.communicate()
    cluster.remove_node(worker, allow_graceful=False)  # mid-job: its task must run again on the head
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err
    # It did run again: the net the lost node was building has the log of another run, in a
    # scratch folder of its own (a job the node had finished would have the lost folder's log).
    net = SCRATCH.fullmatch(lost.name)[1]
    runs = {m[0] for m in SCRATCH.finditer((work / "compile" / "logs" / f"{net}.log").read_text())}
    assert len(runs) == 1 and lost.name not in runs and SCRATCH.fullmatch(runs.pop())[1] == net, (lost, runs)
    remote = work / local.name
    ours, theirs = manifest(remote), manifest(local)
    assert ours["settings"]["cluster"] == cluster.address and ours["settings"]["nodes"] == 2
    assert list(ours["nets"]) == list(theirs["nets"])
    # Net for net: the same options and, tpu-mlir being deterministic but for the build time, the same bytes.
    for net, result in ours["nets"].items():
        assert result["options"] == theirs["nets"][net]["options"], net
        assert bmodel_digest(work / result["bmodel"]) == bmodel_digest(local.parent / theirs["nets"][net]["bmodel"]), net
        assert "$ model_deploy.py" in (work / "compile" / "logs" / f"{net}.log").read_text(), net
    assert bmodel_digest(remote) == bmodel_digest(local)
    info = inspect_bmodel(remote, find_toolchain())
    assert list(info.nets) == list(json.loads((work / "export" / "manifest.json").read_text())["nets"])
