"""Shared fixtures: tiny Stable Diffusion / CLIP folders written once per session, tiny backbone config.

- ``tiny_sd_dir``: a diffusers SD folder (``model_index.json``, ``unet/``, ``vae/``) with random weights
  and SD v1's block structure at a few channels (the same sizes as ``BackboneConfig(source="tiny")``).
- ``tiny_sd_checkpoint``: the same weights as one original-layout ``.safetensors`` file.
- ``tiny_clip_dir``: a CLIP text model (32-d) + a CLIPTokenizer with a byte-level character vocabulary.
- ``tiny_backbone_config``: ``BackboneConfig(source="tiny")``.
- ``ray_nodes`` (session): the one Ray cluster of the test run, two nodes on this machine (a 1-CPU
  head and a 1-CPU worker node, token auth, 127.0.0.1), so every 2-worker run spans two nodes; it can
  kill and add worker nodes. ``ray_head``: its address, with ``RAY_ADDRESS`` and the token in the
  environment of every process; ``ray_cluster`` (per module): this process connected to it. Entry points that connect themselves (``vpd_ray.tune``)
  take ``ray_head`` only.
- :func:`free_port`: a free 127.0.0.1 port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray cluster of several nodes on this machine: a head and worker nodes, each a ``ray start
    --block`` process of ours in its own process group, on private 127.0.0.1 ports, token auth.
    :meth:`kill_node` takes a worker node down at once (its raylet and workers, SIGKILL), as a lost
    machine; :meth:`add_node` joins a new one."""

    def __init__(self, temp_dir: str):
        import secrets

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": self.address}
        self.temp_dir = temp_dir
        dashboard = free_port()
        self.jobs_address = f"http://127.0.0.1:{dashboard}"  # the job API, for `ray job submit --address`
        self.head = self._start(["--head", f"--port={self.port}", f"--dashboard-port={dashboard}",
                                 "--dashboard-host=127.0.0.1"], num_cpus=1)
        self.workers: list[subprocess.Popen] = []

    def _start(self, role: list[str], num_cpus: int) -> subprocess.Popen:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port")]
        return subprocess.Popen(
            [ray_cli, "start", "--block", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
             "--num-gpus=0", "--object-store-memory=1000000000", *ports, "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}"],
            env={**os.environ, **self.auth, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def add_node(self, num_cpus: int = 1) -> subprocess.Popen:
        node = self._start([f"--address={self.address}"], num_cpus)
        self.workers.append(node)
        return node

    def kill_node(self, node: subprocess.Popen) -> None:
        import signal

        os.killpg(node.pid, signal.SIGKILL)  # its own process group: only this node's processes
        node.wait(timeout=60)
        self.workers.remove(node)

    def alive_nodes(self) -> int:
        import ray

        return sum(n["Alive"] for n in ray.nodes())

    def stop(self) -> None:
        """SIGTERM to each node's ``ray start``, then its whole process group killed after a short grace:
        the test run ends here, so nothing needs the slow graceful shutdown of every worker process."""
        import signal

        for node in [*self.workers, self.head]:
            node.terminate()
        for node in [*self.workers, self.head]:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # its own group: only this node's processes


@pytest.fixture(scope="session")
def ray_nodes():
    """The session's cluster: a 1-CPU head and a 1-CPU worker node, so a 2-worker run spans two nodes.
    Our own head, not ``ray.init()``'s: with no address, Ray Train's placement-group cleaner guesses
    the cluster, and with other Ray instances on the machine it can pick one and kill our workers.
    ``RAY_ADDRESS`` and the token are in the environment of every process."""
    temp_dir = tempfile.mkdtemp(prefix="vpdray")  # short: Ray's socket paths must stay under 107 bytes
    cluster = LocalCluster(temp_dir)
    cluster.add_node()
    os.environ.update(cluster.auth)
    import ray

    connect(cluster.address)
    wait_for_cpus(2)
    ray.shutdown()
    try:
        yield cluster
    finally:
        cluster.stop()
        for key in cluster.auth:
            os.environ.pop(key, None)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(ray_nodes):
    """The GCS address of the session's cluster (:func:`ray_nodes`)."""
    return ray_nodes.address


@pytest.fixture(scope="module")
def ray_cluster(ray_head):
    """This process connected to the session's head for one test module."""
    import ray

    connect(ray_head)
    wait_for_idle_cluster()
    try:
        yield ray_head
    finally:
        ray.shutdown()


def connect(address: str) -> None:
    """``ray.init(address)`` once the head answers, with the token this process got after importing Ray."""
    import ray
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    _enable_token_auth()  # re-reads RAY_AUTH_MODE in case Ray was imported before the head started
    AuthenticationTokenLoader.instance().reset_cache()
    for _ in range(60):
        try:
            ray.init(address=address)
            return
        except ConnectionError:
            time.sleep(1)
    raise RuntimeError(f"no Ray head at {address}")


def wait_for_cpus(cpus: float, timeout_s: float = 120) -> None:
    """Until the connected cluster has ``cpus`` CPUs (a node joining or a lost one replaced)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("CPU", 0) < cpus:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster has {ray.cluster_resources().get('CPU', 0)} CPUs, not {cpus}")
        time.sleep(0.5)


def wait_for_idle_cluster(timeout_s: float = 120) -> None:
    """Until every CPU of the connected cluster is free: a run that an earlier test left behind would
    hold workers and starve the next module's runs. On timeout, name what still holds resources."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            actors = [f"{a.class_name} on {a.node_id[:8]}" for a in list_actors(filters=[("state", "=", "ALIVE")])]
            groups = [f"{g.placement_group_id[:8]} {g.bundles}" for g in
                      list_placement_groups(filters=[("state", "=", "CREATED")])]
            raise RuntimeError(f"the cluster is not idle after {timeout_s} s: {ray.available_resources()} free of "
                               f"{ray.cluster_resources()}; alive actors {actors}; placement groups {groups}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def process_group():
    """torch.distributed of world size 1 over gloo on 127.0.0.1, as DeepSpeed's engine needs one for an
    in-process engine; DeepSpeed's cached clone of the world group is dropped before and after (another
    module's group may be gone)."""
    import deepspeed
    import deepspeed.utils.groups
    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        deepspeed.utils.groups._WORLD_GROUP = None
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()
        deepspeed.utils.groups._WORLD_GROUP = None


@pytest.fixture(scope="session")
def tiny_backbone_config():
    from vpd_ray.model.backbone import BackboneConfig

    return BackboneConfig(source="tiny")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vpd_ray.model.backbone import BackboneConfig, tiny_unet_config, tiny_vae_config

    cfg = BackboneConfig(source="tiny")
    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(1)
    UNet2DConditionModel(**tiny_unet_config(cfg)).save_pretrained(root / "unet")
    AutoencoderKL(**tiny_vae_config(cfg)).save_pretrained(root / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="session")
def tiny_sd_checkpoint(tiny_sd_dir, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from sd_layout import to_original_checkpoint

    unet = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors")
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny-sd-v1.safetensors"
    save_file(to_original_checkpoint(unet, vae), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_clip")
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII: byte-level BPE maps these to themselves
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    tokenizer.save_pretrained(root)
    config = CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(root)
    return root
