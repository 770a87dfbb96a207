"""Checkpoint names -> local files: a path, a Hugging Face Hub id, or an official Mask2Former model-zoo name.

``resolve_checkpoint(name)``, in this order:
1. an existing file or folder is used as it is (a local path always wins);
2. a model-zoo name (:data:`ZOO`, optionally written ``zoo:NAME``): the official detectron2 ``.pkl`` is downloaded
   once into ``$MASK2FORMER_CACHE`` (default ``~/.cache/mask2former/zoo``) with a progress bar, into a temporary
   file that is renamed only when it is complete and its checksum holds; the preset it was trained with comes along
   (:func:`zoo_preset`) so that ``read_checkpoint`` knows its architecture and class names;
3. ``org/name`` or ``org/name@revision``: a Hugging Face Hub repository through ``huggingface_hub`` (the optional
   extra ``mask2former[hub]``), its standard cache and ``HF_HUB_OFFLINE``.
Anything else is a one-line error saying what to do. Nothing here runs unless a name is not a local path.

Checksums: the official file names carry the first 6 hex digits of the file's md5 ("model_final_94dc52.pkl"; the
model zoo's own integrity check); no full digest is published, so the prefix, the announced size and the pickle
header are what is checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

ZOO_BASE_URL = "https://dl.fbaipublicfiles.com/maskformer/mask2former"
ZOO_URL_ENV = "MASK2FORMER_ZOO_URL"  # another base URL (a mirror; the tests' local server)
CACHE_ENV = "MASK2FORMER_CACHE"
FILE_SUFFIXES = (".pkl", ".pth", ".pt", ".safetensors", ".bin", ".yaml", ".json")  # a path, never a Hub id
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


@dataclass(frozen=True)
class ZooEntry:
    """One official checkpoint: its path under the zoo's base URL, the preset it was trained with, and the md5
    prefix its file name carries."""

    path: str
    preset: str
    md5_prefix: str

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


# The official checkpoints that have a preset here (MODEL_ZOO.md of facebookresearch/Mask2Former); the others
# (R101, Swin-S/B) can be downloaded by hand and loaded as a .pkl path.
ZOO: dict[str, ZooEntry] = {
    "coco_panoptic_r50": ZooEntry("coco/panoptic/maskformer2_R50_bs16_50ep/model_final_94dc52.pkl",
                                  "coco_panoptic_r50", "94dc52"),
    "coco_panoptic_swin_tiny": ZooEntry("coco/panoptic/maskformer2_swin_tiny_bs16_50ep/model_final_9fd0ae.pkl",
                                        "coco_panoptic_swin_tiny", "9fd0ae"),
    "coco_panoptic_swin_large": ZooEntry(
        "coco/panoptic/maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_f07440.pkl",
        "coco_panoptic_swin_large", "f07440"),
    "coco_instance_r50": ZooEntry("coco/instance/maskformer2_R50_bs16_50ep/model_final_3c8ec9.pkl",
                                  "coco_instance_r50", "3c8ec9"),
    "coco_instance_swin_tiny": ZooEntry("coco/instance/maskformer2_swin_tiny_bs16_50ep/model_final_86143f.pkl",
                                        "coco_instance_swin_tiny", "86143f"),
    "coco_instance_swin_large": ZooEntry(
        "coco/instance/maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_e5f453.pkl",
        "coco_instance_swin_large", "e5f453"),
    "ade20k_semantic_r50": ZooEntry("ade20k/semantic/maskformer2_R50_bs16_160k/model_final_500878.pkl",
                                    "ade20k_semantic_r50", "500878"),
    "ade20k_semantic_swin_tiny": ZooEntry("ade20k/semantic/maskformer2_swin_tiny_bs16_160k/model_final_5274a6.pkl",
                                          "ade20k_semantic_swin_tiny", "5274a6"),
    "ade20k_semantic_swin_large": ZooEntry(
        "ade20k/semantic/maskformer2_swin_large_IN21k_384_bs16_160k_res640/model_final_6b4a3a.pkl",
        "ade20k_semantic_swin_large", "6b4a3a"),
    "cityscapes_panoptic_r50": ZooEntry("cityscapes/panoptic/maskformer2_R50_bs16_90k/model_final_4ab90c.pkl",
                                        "cityscapes_panoptic_r50", "4ab90c"),
    "cityscapes_panoptic_swin_tiny": ZooEntry(
        "cityscapes/panoptic/maskformer2_swin_tiny_bs16_90k/model_final_ceba0f.pkl",
        "cityscapes_panoptic_swin_tiny", "ceba0f"),
    "cityscapes_panoptic_swin_large": ZooEntry(
        "cityscapes/panoptic/maskformer2_swin_large_IN21k_384_bs16_90k/model_final_064788.pkl",
        "cityscapes_panoptic_swin_large", "064788"),
    "cityscapes_semantic_r50": ZooEntry("cityscapes/semantic/maskformer2_R50_bs16_90k/model_final_cc1b1f.pkl",
                                        "cityscapes_semantic_r50", "cc1b1f"),
    "cityscapes_semantic_swin_tiny": ZooEntry(
        "cityscapes/semantic/maskformer2_swin_tiny_bs16_90k/model_final_2d58d4.pkl",
        "cityscapes_semantic_swin_tiny", "2d58d4"),
    "cityscapes_semantic_swin_large": ZooEntry(
        "cityscapes/semantic/maskformer2_swin_large_IN21k_384_bs16_90k/model_final_17c1ee.pkl",
        "cityscapes_semantic_swin_large", "17c1ee"),
}


def zoo_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mask2former" / "zoo")


def _zoo_name(name: str) -> str | None:
    bare = name.removeprefix("zoo:")
    return bare if bare in ZOO else None


def zoo_preset(name: str | Path) -> str | None:
    """The preset of a model-zoo name (None for a local path or any other name)."""
    if Path(name).exists():
        return None
    zoo = _zoo_name(str(name))
    return ZOO[zoo].preset if zoo else None


def resolve_checkpoint(name: str | Path, cache_dir: str | Path | None = None, base_url: str | None = None) -> Path:
    """A local path for checkpoint ``name`` (see the module doc); downloads only for a zoo name or a Hub id."""
    if Path(name).exists():
        return Path(name)
    text = str(name)
    zoo = _zoo_name(text)
    if zoo is not None:
        return download_zoo(zoo, cache_dir, base_url)
    if text.startswith("zoo:"):
        raise CheckpointError(f"{text}: not a model-zoo name (known: {', '.join(ZOO)})")
    if HUB_ID.match(text) and not text.endswith(FILE_SUFFIXES):
        return download_hub(text)
    raise CheckpointError(f"checkpoint {text} does not exist (not a file or folder, not a model-zoo name such as "
                          f"coco_panoptic_r50, not a Hugging Face Hub id org/name)")


# ----- Hugging Face Hub ----------------------------------------------------------------------------------------


def download_hub(repo: str) -> Path:
    """The local snapshot of Hub repository ``org/name[@revision]`` (the standard cache; honours HF_HUB_OFFLINE)."""
    repo_id, _, revision = repo.partition("@")
    try:
        import huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise CheckpointError(f"{repo}: no such file or folder; to load it as a Hugging Face Hub id, install the "
                              f"hub extra: pip install mask2former[hub]") from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision or None,
            allow_patterns=["*.json", "*.yaml", "*.safetensors", "*.txt", "*.md"])
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo}: no such file or folder, and not in the Hugging Face cache while offline (HF_HUB_OFFLINE or no "
            f"network); download it once online (huggingface-cli download {repo_id}) or give a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such file or folder, and no such Hugging Face Hub repository "
                              f"(or it is private: log in with huggingface-cli login)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo}: the Hub repository {repo_id} has no revision {revision!r}") from None
    except Exception as error:  # noqa: BLE001 - network and HTTP errors of any kind: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{repo}: Hugging Face Hub download failed ({first})") from None
    return Path(folder)


# ----- model zoo -----------------------------------------------------------------------------------------------


def download_zoo(name: str, cache_dir: str | Path | None = None, base_url: str | None = None,
                 progress: bool = True) -> Path:
    """The cached file of zoo checkpoint ``name``, downloaded first when missing (see the module doc)."""
    entry = ZOO[name]
    target = Path(cache_dir or zoo_cache_dir()) / entry.path
    if target.is_file():
        return target
    url = f"{(base_url or os.environ.get(ZOO_URL_ENV) or ZOO_BASE_URL).rstrip('/')}/{entry.path}"
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=f".{entry.file_name}.", suffix=".part")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            size, expected, digest = _fetch(url, file, name, progress, target)
        if expected is not None and size != expected:
            raise CheckpointError(f"{name}: download from {url} interrupted after {size} of {expected} bytes; "
                                  f"nothing was kept, run again")
        if not digest.startswith(entry.md5_prefix):
            raise CheckpointError(f"{name}: checksum mismatch for {url} (md5 {digest}, the file name says "
                                  f"{entry.md5_prefix}...); nothing was kept")
        with open(temporary, "rb") as file:
            if file.read(1) != b"\x80":  # pickle protocol >= 2 header: an HTML error page is not a checkpoint
                raise CheckpointError(f"{name}: {url} did not send a pickle file; nothing was kept")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _fetch(url: str, file, name: str, progress: bool, target: Path) -> tuple[int, int | None, str]:
    """Stream ``url`` into ``file``: ``(bytes written, announced size, md5 hex)``."""
    from tqdm.auto import tqdm

    md5 = hashlib.md5()
    size = 0
    expected = None
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"downloading {name}",
                      disable=not progress) as bar:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    file.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise CheckpointError(f"{name}: download from {url} failed (HTTP {error.code}); nothing was kept") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        # http.client.IncompleteRead is an HTTPException, caught below; URLError covers "no network".
        reason = getattr(error, "reason", error)
        raise CheckpointError(f"{name}: download from {url} failed after {size} bytes ({reason}); nothing was kept; "
                              f"run again, or download it by hand to {target}") from None
    except Exception as error:  # http.client.HTTPException (IncompleteRead: the connection was cut)
        raise CheckpointError(f"{name}: download from {url} interrupted after {size}"
                              f"{f' of {expected}' if expected else ''} bytes ({type(error).__name__}); "
                              f"nothing was kept, run again") from None
    return size, expected, md5.hexdigest()


__all__ = ["ZOO", "ZooEntry", "download_hub", "download_zoo", "resolve_checkpoint", "zoo_cache_dir", "zoo_preset"]
