"""Pack and check a Spot Extension (.spx): a gzipped tar of manifest.json, docker-compose.yml, the
icon and a gzipped ``docker save`` archive of the image(s) the compose file runs.

    python packaging/spx.py pack --image-archive dist/spotrelay-image-arm64.tar.gz --out dist/X.spx
    python packaging/spx.py check dist/spotrelay-0.1.0.spx [--arch arm64]

The checker is what a robot's installer would refuse, caught on the developer's machine: names,
version, every file the manifest names, the image tag the compose file runs, its architecture.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
FORBIDDEN_IN_NAME = ("coreio", "mission_control")
# A CORE I/O admits inbound TCP on these ports only (its firewall, not Docker, drops the rest).
OPEN_PORTS = range(21000, 22001)
# The relay's listening ports, each of which the compose file must publish.
LISTEN_VARS = ("SPOTRELAY_PORT", "SPOTRELAY_MISSION_PORT", "SPOTRELAY_RTSP_PORT")


def project_version() -> str:
    text = (ROOT / "extension" / "spotrelay" / "__init__.py").read_text()
    version = re.search(r'__version__ = "([^"]+)"', text)
    assert version, "no __version__"
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if not pyproject or pyproject.group(1) != version.group(1):
        raise SystemExit("pyproject.toml and spotrelay.__version__ disagree")
    return version.group(1)


def compose_images(compose_text: str) -> list[str]:
    return re.findall(r"^\s*image:\s*[\"']?([^\s\"']+)", compose_text, re.M)


def check_ports(compose_text: str) -> list[str]:
    """Published ports the robot's firewall would drop, and listening ports left unpublished."""
    errors = []
    published = set()
    block = re.search(r"^(\s*)ports:\s*\n((?:\1\s+(?:-.*|#.*)\n)+)", compose_text, re.M)
    for entry in re.findall(r"^\s*-\s*[\"']?([^\"'\s#]+)", block.group(2) if block else "", re.M):
        parts = entry.split("/")[0].rsplit(":", 2)
        host, container = (parts[-2], parts[-1]) if len(parts) > 1 else (parts[0], parts[0])
        if not (host.isdigit() and container.isdigit()) or host != container:
            errors.append(f"port {entry}: publish one number as itself (host:container, the same)")
            continue
        if int(host) not in OPEN_PORTS:
            errors.append(f"port {host} is outside 21000-22000, which a CORE I/O drops")
        published.add(int(container))
    for var in LISTEN_VARS:
        value = re.search(rf"^\s*{var}:\s*[\"']?(\d+)", compose_text, re.M)
        if value and int(value.group(1)) not in published:
            errors.append(f"{var} is {value.group(1)} but the compose file does not publish it")
    return errors


def image_archive_contents(data: bytes) -> dict[str, str]:
    """{repo tag: architecture} from a (gzipped) ``docker save`` archive."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        out = {}
        for entry in manifest:
            config = json.load(tar.extractfile(entry["Config"]))  # type: ignore[arg-type]
            for tag in entry.get("RepoTags") or []:
                out[tag] = config.get("architecture", "?")
    return out


def check_manifest(manifest: dict, version: str | None) -> list[str]:
    errors = []
    name = manifest.get("extension_name", "")
    if not NAME_RE.match(name):
        errors.append(f"extension_name {name!r} must be letters, digits, '-' or '_'")
    if any(word in name.lower() for word in FORBIDDEN_IN_NAME):
        errors.append(f"extension_name {name!r} must not contain {' or '.join(FORBIDDEN_IN_NAME)}")
    if not manifest.get("description"):
        errors.append("description is missing")
    if not VERSION_RE.match(str(manifest.get("version", ""))):
        errors.append(f"version {manifest.get('version')!r} is not X.Y.Z")
    elif version and manifest["version"] != version:
        errors.append(f"version {manifest['version']} is not the project's version {version}")
    if manifest.get("installation_target") not in ("spot", "orbit"):
        errors.append("installation_target must be 'spot' (or 'orbit')")
    images = manifest.get("images")
    if not isinstance(images, list) or not images:
        errors.append("images must list the image archive(s)")
    for key in ("files_to_save", "directories_to_save"):  # kept across upgrades
        paths = manifest.get(key, [])
        if not isinstance(paths, list) or not all(
            isinstance(p, str) and p and not p.startswith("/") and ".." not in p.split("/")
            for p in paths
        ):
            errors.append(f"{key} must list paths inside the extension's folder, as relative ones")
    if "date" in manifest:
        try:
            datetime.datetime.fromisoformat(manifest["date"])
        except (TypeError, ValueError):
            errors.append(f"date {manifest['date']!r} is not ISO 8601")
    return errors


def check_spx(path: Path, arch: str | None = None, version: str | None = None) -> list[str]:
    """Every problem found, as sentences; an empty list means the package is good."""
    try:
        tar = tarfile.open(path, "r:gz")  # noqa: SIM115 - closed by the `with` below, once open
    except (OSError, tarfile.TarError) as exc:
        return [f"{path} is not a gzipped tar: {exc}"]
    with tar:
        names = set(tar.getnames())
        if "manifest.json" not in names:
            return ["manifest.json is missing"]
        try:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        except ValueError as exc:
            return [f"manifest.json does not parse: {exc}"]
        errors = check_manifest(manifest, version)
        if "date" not in manifest:
            errors.append("date is missing (pack adds it)")
        wanted = ["docker-compose.yml", *manifest.get("images", [])]
        if manifest.get("icon"):
            wanted.append(manifest["icon"])
        errors += [f"{n} is named but not in the package" for n in wanted if n not in names]
        if errors:
            return errors
        compose = tar.extractfile("docker-compose.yml").read().decode()  # type: ignore[union-attr]
        errors += check_ports(compose)
        tags: dict[str, str] = {}
        for archive in manifest["images"]:
            tags.update(image_archive_contents(tar.extractfile(archive).read()))  # type: ignore[union-attr]
        for image in compose_images(compose) or ["<none>"]:
            if image not in tags:
                errors.append(f"compose runs {image} but the image archive holds {sorted(tags)}")
            elif arch and tags[image] != arch:
                errors.append(f"{image} is built for {tags[image]}, the robot needs {arch}")
    return errors


def pack(image_archive: Path, out: Path) -> None:
    version = project_version()
    manifest = json.loads((ROOT / "manifest.json").read_text())
    manifest.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
    errors = check_manifest(manifest, version)
    if manifest["images"] != [image_archive.name]:
        errors.append(f"manifest images {manifest['images']} != [{image_archive.name!r}]")
    if errors:
        raise SystemExit("spx: " + "; ".join(errors))
    body = json.dumps(manifest, indent=2).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mode = len(body), 0o644
        info.mtime = int(datetime.datetime.now().timestamp())
        tar.addfile(info, io.BytesIO(body))
        tar.add(ROOT / "docker-compose.yml", arcname="docker-compose.yml")
        tar.add(ROOT / manifest["icon"], arcname=manifest["icon"])
        tar.add(image_archive, arcname=image_archive.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spx.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="make the .spx")
    p.add_argument("--image-archive", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check", help="verify a .spx")
    c.add_argument("spx", type=Path)
    c.add_argument("--arch", default=None, help="required image architecture (arm64 for CORE I/O)")
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(args.image_archive, args.out)
        print(f"spx: wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
        return 0
    errors = check_spx(args.spx, args.arch, project_version())
    for error in errors:
        print(f"spx: {args.spx}: {error}", file=sys.stderr)
    if not errors:
        print(f"spx: {args.spx}: OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
