"""The .spx checker refuses what a robot's installer would, and accepts a good package."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
import spx  # noqa: E402


def _tar(files: dict[str, bytes], compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_archive(tag: str, arch: str) -> bytes:
    """A gzipped archive laid out as `docker save` writes it."""
    config = json.dumps({"architecture": arch, "os": "linux"}).encode()
    manifest = json.dumps([{"Config": "abc.json", "RepoTags": [tag], "Layers": []}]).encode()
    return gzip.compress(_tar({"manifest.json": manifest, "abc.json": config}, compress=False))


def package(
    tmp_path: Path,
    *,
    manifest: dict | None = None,
    tag: str | None = None,
    arch: str = "arm64",
    drop: str | None = None,
) -> Path:
    version = spx.project_version()
    m = json.loads((ROOT / "manifest.json").read_text())
    m["date"] = "2026-11-24T10:00:00"
    m.update(manifest or {})
    files = {
        "manifest.json": json.dumps(m).encode(),
        "docker-compose.yml": (ROOT / "docker-compose.yml").read_bytes(),
        "icon.png": (ROOT / "icon.png").read_bytes(),
        m["images"][0]: image_archive(tag or f"spotrelay:{version}", arch),
    }
    files.pop(drop, None)
    out = tmp_path / "x.spx"
    out.write_bytes(_tar(files, compress=True))
    return out


def test_shipped_files_agree_with_the_project():
    version = spx.project_version()
    manifest = json.loads((ROOT / "manifest.json").read_text())
    assert spx.check_manifest(manifest, version) == []
    assert spx.compose_images((ROOT / "docker-compose.yml").read_text()) == [f"spotrelay:{version}"]
    assert (ROOT / manifest["icon"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the compose file's captures and certificate volumes are the folders kept across upgrades
    compose = (ROOT / "docker-compose.yml").read_text()
    assert manifest["directories_to_save"] == ["captures", "tls"]
    assert "./captures:/captures" in compose and "./tls:/tls" in compose
    # HTTP, the Autowalk callback and RTSP are published as themselves, inside 21000-22000
    assert spx.check_ports(compose) == []
    assert 'SPOTRELAY_RTSP_PORT: "21082"' in compose


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("21082:21082", "21082:8554"), "publish one number as itself"),
        (("21082:21082", "8554:8554"), "outside 21000-22000"),
        (('SPOTRELAY_RTSP_PORT: "21082"', 'SPOTRELAY_RTSP_PORT: "21090"'), "does not publish it"),
    ],
)
def test_ports_the_robot_would_drop_are_refused(change, complaint):
    compose = (ROOT / "docker-compose.yml").read_text().replace(*change)
    assert any(complaint in e for e in spx.check_ports(compose)), spx.check_ports(compose)


def test_a_good_package_passes(tmp_path):
    assert spx.check_spx(package(tmp_path), "arm64", spx.project_version()) == []


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"manifest": {"extension_name": "my relay"}}, "letters, digits"),
        ({"manifest": {"extension_name": "coreio_relay"}}, "must not contain"),
        ({"manifest": {"version": "1.0"}}, "X.Y.Z"),
        ({"manifest": {"version": "9.9.9"}}, "project's version"),
        ({"manifest": {"installation_target": "mars"}}, "installation_target"),
        ({"manifest": {"date": "yesterday"}}, "ISO 8601"),
        ({"manifest": {"directories_to_save": ["/data/captures"]}}, "directories_to_save"),
        ({"manifest": {"files_to_save": "../x"}}, "files_to_save"),
        ({"drop": "icon.png"}, "icon.png is named but not in the package"),
        ({"tag": "spotrelay:old"}, "compose runs spotrelay:"),
        ({"arch": "amd64"}, "built for amd64"),
    ],
)
def test_bad_packages_are_refused_with_the_reason(tmp_path, kwargs, complaint):
    errors = spx.check_spx(package(tmp_path, **kwargs), "arm64", spx.project_version())
    assert any(complaint in e for e in errors), errors


def test_not_a_package(tmp_path):
    bad = tmp_path / "x.spx"
    bad.write_bytes(b"hello")
    assert "not a gzipped tar" in spx.check_spx(bad)[0]
