"""The deploy manifests must start kvfs with arguments the CLI actually accepts."""

import glob
import os

import yaml

from kvfs.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _containers():
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        with open(path) as f:
            docs = list(yaml.safe_load_all(f))
        for doc in docs:
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                yield os.path.basename(path), container


def test_manifest_args_parse_with_the_cli():
    seen = set()
    parser = build_parser()
    for name, container in _containers():
        args = [a.replace("$(POD_IP)", "10.0.0.1") for a in container["args"]]
        parsed = parser.parse_args(args)
        seen.add(parsed.command)
        assert callable(parsed.func), name
    assert seen == {"meta", "chunkserver", "mount"}


def test_dockerfile_entrypoint_is_the_cli():
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        text = f.read()
    assert 'ENTRYPOINT ["kvfs"]' in text
    assert "fuse3" in text


def _args_of(name: str) -> tuple[dict, list[str]]:
    containers = [c for manifest, c in _containers() if manifest == name]
    assert len(containers) == 1, name
    return containers[0], list(containers[0]["args"])


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_manifests_run_as_a_cluster(tmp_path):
    """Start meta, a chunkserver and a mount with exactly the manifests' arguments (addresses and host
    paths rewritten to this machine), then write and read through the mount. The manifests' probes,
    Service port and shared chunk directory must agree with those arguments."""
    import socket
    import subprocess

    from cluster import Proc, free_port, is_mounted, wait_for

    import kvfs

    meta_c, meta_args = _args_of("meta.yaml")
    cs_c, cs_args = _args_of("chunkserver.yaml")
    mount_c, mount_args = _args_of("mount.yaml")
    meta_port = int(_flag(meta_args, "--listen").rsplit(":", 1)[1])
    cs_port = int(_flag(cs_args, "--listen").rsplit(":", 1)[1])
    assert meta_c["readinessProbe"]["tcpSocket"]["port"] == meta_port
    assert cs_c["readinessProbe"]["tcpSocket"]["port"] == cs_port
    assert _flag(cs_args, "--advertise").endswith(f":{cs_port}")
    with open(os.path.join(ROOT, "deploy", "k8s", "meta.yaml")) as f:
        service = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "Service")
    service_name, service_port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    assert service_port == meta_port and service["spec"]["ports"][0]["targetPort"] == meta_port
    assert _flag(cs_args, "--meta") == _flag(mount_args, "--meta") == f"{service_name}:{service_port}"
    # Short-circuit reads: the mount sees the chunk files at the chunkserver's own data path.
    assert any(v["mountPath"] == _flag(cs_args, "--data-dir") for v in mount_c["volumeMounts"])

    # The meta manifest's replication factor decides how many chunkserver nodes (DaemonSet pods) the
    # cluster needs; run that many, each with the chunkserver manifest's arguments.
    replicas = int(_flag(meta_args, "--replication"))
    local_meta = free_port()
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    common = {
        _flag(meta_args, "--listen"): f"127.0.0.1:{local_meta}",
        f"{service_name}:{service_port}": f"127.0.0.1:{local_meta}",
        _flag(meta_args, "--data-dir"): str(tmp_path / "meta"),
        mount_args[1]: mnt,
    }
    commands = [[common.get(a, a) for a in meta_args]]
    for i in range(replicas):
        port = free_port()
        node = dict(common, **{_flag(cs_args, "--listen"): f"127.0.0.1:{port}",
                               _flag(cs_args, "--advertise"): f"127.0.0.1:{port}",
                               _flag(cs_args, "--data-dir"): str(tmp_path / f"chunks{i}")})
        commands.append([node.get(a, a) for a in cs_args])
    commands.append([common.get(a, a) for a in mount_args])
    # Each container's certificate comes from a Secret mounted at its --tls-dir: issue the same roles here.
    from cluster import make_tls

    for manifest, container, args in (("meta.yaml", meta_c, meta_args), ("chunkserver.yaml", cs_c, cs_args),
                                      ("mount.yaml", mount_c, mount_args)):
        mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
        with open(os.path.join(ROOT, "deploy", "k8s", manifest)) as f:
            pod = next(d for d in yaml.safe_load_all(f) if d and d["kind"] != "Service")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "secret" in volumes[mounts[_flag(args, "--tls-dir")]], manifest
        assert not pod.get("hostNetwork"), manifest  # docs/security.md: none of them needs it
    certs = make_tls(str(tmp_path), replicas)
    for i, args in enumerate(commands):
        args[args.index("--tls-dir") + 1] = certs["meta" if i == 0 else "client" if i == replicas + 1 else f"cs{i - 1}"]
    procs = [Proc(args, str(tmp_path / f"{i}.log")) for i, args in enumerate(commands)]
    try:
        for proc in procs[:-1]:
            proc.start()

        def meta_listens() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", local_meta)) == 0

        wait_for(meta_listens, 20, "meta to listen")
        with kvfs.SyncClient(f"127.0.0.1:{local_meta}", kvfs.ClientOptions(timeout=5, tls_dir=certs["client"])) as c:
            wait_for(lambda: sum(s.alive for s in c.refresh_servers().servers) == replicas, 30, "chunkservers")
        procs[-1].start()
        wait_for(lambda: is_mounted(mnt) or not procs[-1].alive(), 30, "the mount")
        assert is_mounted(mnt), procs[-1].log()
        data = os.urandom(9 << 20)
        with open(os.path.join(mnt, "weights.bin"), "wb") as f:
            f.write(data)
        with kvfs.SyncClient(f"127.0.0.1:{local_meta}", kvfs.ClientOptions(tls_dir=certs["client"])) as c:
            assert c.read_file("/weights.bin") == data
            assert all(len(ref.replicas) == replicas for ref in c.chunk_map(c.resolve("/weights.bin").ino).chunks)
    finally:
        for proc in reversed(procs):
            proc.kill(15)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
