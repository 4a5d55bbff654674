"""What the model repository holds: one :class:`EndpointSpec` per exported endpoint.

Read once at start from each endpoint's sidecar (``clipserve.json``) and ``config.pbtxt``. The
gateway needs the repository even when Triton runs elsewhere: sidecars carry image sizes,
temperatures and thresholds, and the tokenizers sit next to the text towers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from clipserve.endpoints import (ENCODED_INPUT, IMAGE_INPUT, SIDECAR_FILENAME, TEXT_INPUT,
                                 TOKENIZER_FILENAME, Precision, Sidecar, Tower, endpoint_name)

from .errors import ServingError

log = logging.getLogger(__name__)

# Only the top-level field: nested messages (dynamic_batching { ... }) never use this name.
_MAX_BATCH_SIZE = re.compile(r"^\s*max_batch_size\s*:\s*(\d+)", re.MULTILINE)
_INSTANCE_GROUP = re.compile(r"\binstance_group\s*:?\s*\[")
_COUNT = re.compile(r"\bcount\s*:\s*(\d+)")
_GPUS = re.compile(r"\bgpus\s*:\s*\[([^\]]*)\]")


def _bracketed(text: str, start: int, open_: str, close: str) -> str:
    """The text from ``start`` (just past an opening bracket) to its matching close."""
    depth = 1
    for i in range(start, len(text)):
        depth += (text[i] == open_) - (text[i] == close)
        if depth == 0:
            return text[start:i]
    return text[start:]


def instance_count(config_text: str) -> int:
    """Model instances a config.pbtxt asks Triton for: each instance_group entry's count
    (1 without one), times its GPUs where it lists them; 1 without instance_group."""
    found = _INSTANCE_GROUP.search(config_text)
    if found is None:
        return 1
    groups = _bracketed(config_text, found.end(), "[", "]")
    total, i = 0, groups.find("{")
    while i >= 0:
        entry = _bracketed(groups, i + 1, "{", "}")
        count = _COUNT.search(entry)
        gpus = _GPUS.search(entry)
        total += ((int(count.group(1)) if count else 1)
                  * (max(1, len([g for g in gpus.group(1).split(",") if g.strip()]))
                     if gpus else 1))
        i = groups.find("{", i + 1 + len(entry) + 1)
    return total or 1


@dataclass(frozen=True)
class EndpointSpec:
    """One Triton model of the repository, as the gateway sees it.

    Attributes:
        max_batch_size: from config.pbtxt; calls with more items are split into chunks of at
            most this many (0: Triton does not batch this model; send the call whole).
        instance_count: model instances in config.pbtxt's instance_group (1 without one):
            how many requests the gateway keeps in flight for it before it coalesces.
    """

    name: str
    scale: str
    precision: Precision
    tower: Tower
    sidecar: Sidecar
    max_batch_size: int
    directory: Path
    instance_count: int = 1

    @property
    def input_name(self) -> str:
        return IMAGE_INPUT if self.tower is Tower.IMAGE else TEXT_INPUT

    @property
    def gpu_decode(self) -> bool:
        """Whether Triton decodes this image endpoint's files (its sidecar's ``gpu_decode``):
        calls then send encoded bytes to :attr:`triton_model` instead of pixels to the tower."""
        return bool(self.sidecar.gpu_decode)

    @property
    def triton_model(self) -> str:
        """The Triton model the gateway's calls go to: the tower, or with GPU decode the
        ensemble that takes encoded bytes (the tower itself still gets the warm-up)."""
        return self.sidecar.gpu_decode["model"] if self.gpu_decode else self.name

    @property
    def triton_input(self) -> str:
        """The input tensor of :attr:`triton_model`."""
        return (self.sidecar.gpu_decode.get("input", ENCODED_INPUT) if self.gpu_decode
                else self.input_name)

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILENAME


def read_endpoint(directory: Path) -> EndpointSpec:
    """Read one endpoint directory; raises ValueError when its files disagree or are missing."""
    directory = Path(directory)
    sidecar = Sidecar.read(directory)
    precision, tower = Precision(sidecar.precision), Tower(sidecar.tower)
    name = endpoint_name(sidecar.scale, precision, tower)
    if name != directory.name:
        raise ValueError(f"{directory}: sidecar describes {name}, directory is {directory.name}")
    if tower is Tower.IMAGE and not sidecar.image_size:
        raise ValueError(f"{directory / SIDECAR_FILENAME}: image endpoint without image_size")
    if tower is Tower.TEXT and not sidecar.context_length:
        raise ValueError(f"{directory / SIDECAR_FILENAME}: text endpoint without context_length")
    if sidecar.gpu_decode and (tower is not Tower.IMAGE or not isinstance(
            sidecar.gpu_decode.get("model"), str)):
        raise ValueError(f"{directory / SIDECAR_FILENAME}: gpu_decode must be an image "
                         "endpoint's {\"model\": ensemble name, ...}; re-export it")
    try:
        config_text = (directory / "config.pbtxt").read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {directory / 'config.pbtxt'}: {exc}") from exc
    match = _MAX_BATCH_SIZE.search(config_text)
    return EndpointSpec(name=name, scale=sidecar.scale, precision=precision, tower=tower,
                        sidecar=sidecar, max_batch_size=int(match.group(1)) if match else 0,
                        directory=directory, instance_count=instance_count(config_text))


class Catalog:
    """The endpoints of one repository, looked up by scale, precision and tower."""

    def __init__(self, specs: Iterable[EndpointSpec], repository: Path | None = None):
        self._by_name = {spec.name: spec for spec in specs}
        self.repository = Path(repository) if repository is not None else None
        self.scales: tuple[str, ...] = ()
        self._rescale()

    def _rescale(self) -> None:
        self.scales = tuple(sorted({s.scale for s in self._by_name.values()}))

    @classmethod
    def from_repository(cls, repository: Path) -> "Catalog":
        """Every subdirectory with a sidecar; others (report files, foreign models) are skipped.

        Raises:
            ValueError: the directory is missing, holds no endpoint, or one is inconsistent.
        """
        repository = Path(repository)
        if not repository.is_dir():
            raise ValueError(f"model repository {repository} is not a directory; run "
                             "`clipserve export --repository DIR` first")
        specs = []
        for child in sorted(repository.iterdir()):
            if (child / SIDECAR_FILENAME).is_file():
                specs.append(read_endpoint(child))
            elif child.is_dir():
                log.info("skipping %s: no %s", child, SIDECAR_FILENAME)
        if not specs:
            raise ValueError(f"model repository {repository} holds no clipserve endpoint "
                             f"(no */{SIDECAR_FILENAME})")
        return cls(specs, repository)

    def refresh(self) -> tuple[list[EndpointSpec], list[EndpointSpec]]:
        """Follow the repository directory while serving: add the endpoints whose directory
        (with a sidecar) appeared, drop those whose directory is gone. Returns (added,
        removed). Endpoints already held are not re-read (:meth:`reload_sidecars` does
        that). A new directory that does not read is logged and skipped (retried at the next
        refresh); an unreadable repository changes nothing. Calls already holding a dropped
        spec finish with it; later lookups get NOT_FOUND."""
        if self.repository is None:
            return [], []
        try:
            present = {child.name: child for child in self.repository.iterdir()
                       if (child / SIDECAR_FILENAME).is_file()}
        except OSError as exc:
            log.error("cannot list model repository %s: %s", self.repository, exc)
            return [], []
        added = []
        for name in sorted(present.keys() - self._by_name.keys()):
            try:
                spec = read_endpoint(present[name])
            except (ValueError, OSError) as exc:
                log.error("not adding endpoint %s: %s", name, exc)
                continue
            self._by_name[name] = spec
            added.append(spec)
        removed = [self._by_name.pop(name)
                   for name in sorted(self._by_name.keys() - present.keys())]
        if not self._by_name and removed:  # keep serving something rather than nothing
            log.error("every endpoint left %s; keeping the catalog as it was", self.repository)
            self._by_name = {spec.name: spec for spec in removed}
            return [], []
        self._rescale()
        return added, removed

    def reload_sidecars(self) -> list[str]:
        """Re-read every endpoint's sidecar (``clipserve evaluate --write-sidecars`` writes new
        revisions while the gateway runs); returns the names whose revision changed. An
        unreadable one keeps its previous sidecar and is logged."""
        changed = []
        for name, spec in list(self._by_name.items()):
            try:
                fresh = read_endpoint(spec.directory)
            except ValueError as exc:
                log.error("keeping %s's sidecar revision %d: %s", name, spec.sidecar.revision, exc)
                continue
            if fresh.sidecar != spec.sidecar:
                self._by_name[name] = fresh
                changed.append(name)
        return changed

    def __iter__(self) -> Iterator[EndpointSpec]:
        return iter(sorted(self._by_name.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def by_name(self, name: str) -> EndpointSpec | None:
        return self._by_name.get(name)

    def has(self, scale: str, precision: Precision, tower: Tower) -> bool:
        return endpoint_name(scale, precision, tower) in self._by_name

    def get(self, scale: str, precision: Precision, tower: Tower) -> EndpointSpec:
        """The endpoint for (scale, precision, tower).

        Raises:
            ServingError: NOT_FOUND naming what this scale and tower do have.
        """
        spec = self._by_name.get(endpoint_name(scale, precision, tower))
        if spec is None:
            have = sorted(s.precision.value for s in self._by_name.values()
                          if s.scale == scale and s.tower is tower)
            raise ServingError.not_found(
                f"no {tower.value} endpoint {endpoint_name(scale, precision, tower)} in this "
                f"repository; {scale} {tower.value} precisions here: {', '.join(have) or 'none'}")
        return spec

    def targets(self, tower: Tower | None = None) -> set[tuple[str, Precision]]:
        """(scale, precision) pairs present, for one tower or any."""
        return {(s.scale, s.precision) for s in self._by_name.values()
                if tower is None or s.tower is tower}

    def precisions(self) -> list[Precision]:
        present = {s.precision for s in self._by_name.values()}
        return [p for p in Precision if p in present]
