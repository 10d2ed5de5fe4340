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
