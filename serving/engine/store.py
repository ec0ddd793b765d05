"""The adapter store: `<root>/<adapter_id>/` folders, validated, loaded lazily into LRU slots.

Lifecycle: an ID resolves to a folder inside the root; its files are validated before any
weight is read; the weights go into a free slot (evicting the least recently used unpinned,
idle adapter). A folder whose files change on disk is a new version: new requests get a new
slot while requests in flight finish on the old one, which is freed when its last user leaves.

Two tiers, so that a load never stalls decoding: `prepare` reads, hashes, parses and validates
an adapter (any thread, without the store's lock) into a host-memory LRU bounded in bytes;
`try_acquire` (the engine thread) only copies a prepared adapter into a slot, and says None
when it is not prepared yet.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loraplex.serving.errors import AdapterNotFound, AdapterRejected, NoFreeSlot
from loraplex.training import lora_format
from loraplex.training.adapter_id import validate_adapter_id
from loraplex.training.errors import LoraplexError
from loraplex.training.lora_format import CONFIG_NAME, WEIGHTS_NAME, LoraFormatError, LoraModule, LoraSpec
from loraplex.training.manifest import MANIFEST_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass
class PreparedAdapter:
    """A validated adapter in host memory, ready to copy into a slot."""

    adapter_id: str
    version: tuple
    version_id: str
    rank: int
    config: dict
    placed: object  # what the slots copy in: LoraSlots.prepare's tensors, or the raw files (vLLM)
    nbytes: int


@dataclass
class SlotLease:
    """One version of one adapter, resident in one slot; requests hold it while they run."""

    adapter_id: str
    slot: int
    version: tuple
    rank: int
    users: int = 0
    version_id: str = ""  # sha256 prefix of the adapter's config + weights: names the version that answered


class AdapterStore:
    def __init__(
        self,
        root: str | Path,
        slots,
        base_fingerprint: str,
        max_rank: int,
        max_adapter_bytes: int = 1 << 30,
        metrics=None,
        host_bytes: int = 2 << 30,
    ) -> None:
        """slots: an object with `n_slots`, `module_shapes` ({name: (d_in, d_out)}),
        `load_slot(slot, weights)` and `clear_slot(slot)`, and optionally `prepare(weights)` (the
        form load_slot copies fastest); slot 0 is the bare base. host_bytes bounds the host tier."""
        self.root = Path(root).resolve()
        self.slots = slots
        self.base_fingerprint = base_fingerprint
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.metrics = metrics
        self._lock = threading.RLock()
        self._current: OrderedDict[str, SlotLease] = OrderedDict()  # LRU order, newest last
        self._retired: list[SlotLease] = []  # old versions still in use
        self._free = list(range(slots.n_slots - 1, 0, -1))
        self.pinned: set[str] = set()
        self.host_bytes = host_bytes
        self._host: OrderedDict[str, PreparedAdapter] = OrderedDict()  # LRU, newest last
        self._host_lock = threading.Lock()  # guards _host only: never held during I/O
        self.counts = {"slot_hits": 0, "host_hits": 0, "disk_loads": 0}  # acquisitions by tier

    # -- resolving and validating ------------------------------------------------------------

    def folder(self, adapter_id: str) -> Path:
        """The adapter's folder, guaranteed inside the root (no traversal, no symlink escape)."""
        validate_adapter_id(adapter_id)
        path = self.root / adapter_id
        if not path.exists():
            raise AdapterNotFound(f"adapter '{adapter_id}' not found in the store")
        resolved = path.resolve()
        if resolved.parent != self.root:
            raise AdapterRejected(f"adapter '{adapter_id}' resolves outside the store root")
        return resolved

    def _version(self, folder: Path) -> tuple:
        try:
            stats = [(folder / f).stat() for f in (*ADAPTER_FILES, MANIFEST_NAME)]
        except FileNotFoundError as exc:
            raise AdapterRejected(f"adapter folder {folder.name} is missing {Path(exc.filename).name}") from None
        # inode + ctime catch a replaced folder even when sizes and copied mtimes are equal
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)

    def validate(self, adapter_id: str) -> tuple[Path, dict, dict]:
        """Check an adapter before any weight is read: files, manifest, config. Returns its config."""
        folder = self.folder(adapter_id)
        try:
            lora_format.check_files(folder)
        except LoraFormatError as exc:
            raise AdapterRejected(f"adapter '{adapter_id}': {exc}") from None
        for name in (*ADAPTER_FILES, MANIFEST_NAME):
            path = folder / name
            if not path.is_file() or path.is_symlink() and path.resolve().parent != folder:
                raise AdapterRejected(f"adapter '{adapter_id}' is missing {name}")
        weights = folder / WEIGHTS_NAME
        if weights.stat().st_size > self.max_adapter_bytes:
            raise AdapterRejected(f"adapter '{adapter_id}' is larger than {self.max_adapter_bytes} bytes")
        manifest = _read_json(folder / MANIFEST_NAME, adapter_id)
        if manifest.get("base_fingerprint") != self.base_fingerprint:
            raise AdapterRejected(
                f"adapter '{adapter_id}' was trained on another base ({str(manifest.get('base_fingerprint'))[:19]}...)"
            )
        config = _read_json(folder / CONFIG_NAME, adapter_id)
        self._check_spec(adapter_id, config)
        return folder, config, manifest

    def _check_spec(self, adapter_id: str, config: dict) -> LoraSpec:
        """The config's LoRA features and declared ranks, against what these slots can hold."""
        try:
            spec = lora_format.parse_config(config)
        except LoraFormatError as exc:
            raise AdapterRejected(f"adapter '{adapter_id}': {exc}") from None
        declared = max([spec.rank, *spec.rank_pattern.values()])
        if declared > self.max_rank:
            raise AdapterRejected(
                f"adapter '{adapter_id}': rank {declared} is above this server's maximum of {self.max_rank}"
            )
        if spec.has_patterns and not getattr(self.slots, "per_module_scaling", False):
            raise AdapterRejected(
                f"adapter '{adapter_id}': rank_pattern/alpha_pattern (per-module rank or "
                "scaling) is served by the torch engine only; use --engine torch"
            )
        return spec

    def _read_weights(self, adapter_id: str, raw: bytes, config: dict) -> dict[str, LoraModule]:
        """{module path: LoraModule} after checking each tensor's module exists and shapes fit."""
        try:
            modules = lora_format.parse_weights(lora_format.parse_config(config), lora_format.load_weights(raw))
            lora_format.check_fits(modules, self.slots.module_shapes, self.max_rank)
        except LoraFormatError as exc:
            raise AdapterRejected(f"adapter '{adapter_id}': {exc}") from None
        return modules

    def provenance(self, adapter_id: str) -> str:
        """Where the adapter came from, per its manifest: "trained" (by loraplex) or "imported"; "" if unreadable."""
        try:
            manifest = json.loads((self.folder(adapter_id) / MANIFEST_NAME).read_text())
        except (LoraplexError, OSError, ValueError):
            return ""
        return str(manifest.get("provenance", "trained")) if isinstance(manifest, dict) else ""

    # -- residency ---------------------------------------------------------------------------

    def acquire(self, adapter_id: str) -> SlotLease:
        """A lease on the newest version of the adapter, reading it if needed. Caller must release."""
        lease = self.try_acquire(adapter_id)
        return lease if lease is not None else self.try_acquire(adapter_id, self.prepare(adapter_id))

    def try_acquire(self, adapter_id: str, prepared: PreparedAdapter | None = None) -> SlotLease | None:
        """A lease if the adapter's newest version is resident or prepared (then copied into a
        slot: no disk read); None when it must be prepared first. Raises NoFreeSlot when every
        slot is pinned or in use. Caller must release."""
        with self._lock:
            lease = self._current.get(adapter_id)
            folder = self.folder(adapter_id) if lease is None else self.root / adapter_id
            checked = lease is None  # folder() resolved and checked it
            if lease is not None and folder.is_dir():
                try:
                    changed = self._version(folder) != lease.version
                except AdapterRejected:  # mid-replacement on disk: keep serving what we have
                    changed = False
                if changed:
                    self._retire(lease)
                    lease = None
            if lease is not None:
                self.counts["slot_hits"] += 1
            else:
                version = self._version(folder if checked else self.folder(adapter_id))
                if prepared is None or prepared.version != version:
                    prepared = self._host_get(adapter_id, version)
                    if prepared is None:
                        return None
                    self.counts["host_hits"] += 1
                lease = self._place_prepared(prepared)
            self._current.move_to_end(adapter_id)
            lease.users += 1
            return lease

    def prepare(self, adapter_id: str) -> PreparedAdapter:
        """Read, hash, parse and validate the adapter's newest version into the host tier.
        Safe from any thread; takes no slot and never holds the store's lock during I/O."""
        folder = self.folder(adapter_id)
        version = self._version(folder)
        found = self._host_get(adapter_id, version)
        if found is not None:
            return found
        folder, config, _ = self.validate(adapter_id)
        files = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}  # read once: check, hash, place
        weights = self._read_weights(adapter_id, files[WEIGHTS_NAME], config)
        prepared = PreparedAdapter(
            adapter_id=adapter_id,
            version=version,
            version_id=hashlib.sha256(b"".join(files.values())).hexdigest()[:12],
            rank=max(m.rank for m in weights.values()),
            config=config,
            **self._prepare_placement(weights, files),
        )
        with self._host_lock:
            self.counts["disk_loads"] += 1
            self._host[adapter_id] = prepared
            self._host.move_to_end(adapter_id)
            total = sum(p.nbytes for p in self._host.values())
            while total > self.host_bytes and len(self._host) > 1:
                _, dropped = self._host.popitem(last=False)
                total -= dropped.nbytes
        return prepared

    def _host_get(self, adapter_id: str, version: tuple) -> PreparedAdapter | None:
        with self._host_lock:
            prepared = self._host.get(adapter_id)
            if prepared is None or prepared.version != version:
                return None
            self._host.move_to_end(adapter_id)
            return prepared

    def host_resident(self) -> list[str]:
        """IDs in the host tier, least recently used first."""
        with self._host_lock:
            return list(self._host)

    def _prepare_placement(self, weights: dict[str, LoraModule], files: dict[str, bytes]) -> dict:
        """`placed` (what a slot placement copies: here the slots' prepared tensors) and its `nbytes`."""
        prepare = getattr(self.slots, "prepare", None)
        placed = prepare(weights) if prepare else weights
        return {"placed": placed, "nbytes": _tensor_bytes(placed)}

    def _place_prepared(self, prepared: PreparedAdapter) -> SlotLease:
        started = time.perf_counter()
        slot = self._take_slot()
        try:
            self._place(slot, prepared)
        except Exception:
            self._free_slot(slot)
            raise
        lease = SlotLease(prepared.adapter_id, slot, prepared.version, prepared.rank, version_id=prepared.version_id)
        self._current[prepared.adapter_id] = lease
        if self.metrics:
            self.metrics.adapter_loaded(prepared.adapter_id, time.perf_counter() - started, len(self._current))
        return lease

    def release(self, lease: SlotLease) -> None:
        with self._lock:
            lease.users -= 1
            if lease in self._retired and lease.users == 0:
                self._retired.remove(lease)
                self._free_slot(lease.slot)

    def _place(self, slot: int, prepared: PreparedAdapter) -> None:
        """Put a prepared adapter into a slot: here a copy of its tensors, each module with its own
        rank and scaling (the vLLM store registers the files instead)."""
        self.slots.load_slot(slot, prepared.placed)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for adapter_id, lease in self._current.items():  # oldest first
            if adapter_id not in self.pinned and lease.users == 0:
                self._evict(adapter_id)
                return self._free.pop()
        raise NoFreeSlot("every adapter slot is pinned or in use; try again shortly")

    def _evict(self, adapter_id: str) -> None:
        self._retire(self._current[adapter_id])
        if self.metrics:
            self.metrics.adapter_evicted(adapter_id, len(self._current))

    def _retire(self, lease: SlotLease) -> None:
        """Take the lease out of service; its slot frees now, or when its last request leaves."""
        del self._current[lease.adapter_id]
        if lease.users:
            self._retired.append(lease)
        else:
            self._free_slot(lease.slot)

    def _free_slot(self, slot: int) -> None:
        self.slots.clear_slot(slot)
        self._free.append(slot)

    # -- admin -------------------------------------------------------------------------------

    def unload(self, adapter_id: str) -> bool:
        """Drop the adapter from memory (requests in flight finish first). True if it was resident."""
        validate_adapter_id(adapter_id)
        with self._lock:
            self.pinned.discard(adapter_id)
            if adapter_id not in self._current:
                return False
            self._evict(adapter_id)
            return True

    def pin(self, adapter_id: str, pinned: bool = True) -> SlotLease | None:
        """Pinned adapters are loaded now and never evicted by LRU."""
        with self._lock:
            if not pinned:
                self.pinned.discard(validate_adapter_id(adapter_id))
                return self._current.get(adapter_id)
            lease = self.acquire(adapter_id)
            self.pinned.add(adapter_id)
            self.release(lease)
            return lease

    def resident(self) -> dict[str, SlotLease]:
        with self._lock:
            return dict(self._current)

    def available(self) -> list[str]:
        """IDs of the adapter folders in the store (not validated)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and _safe(p.name)
        )


def _tensor_bytes(placed: dict) -> int:
    """Bytes of the tensors in {module: (a, b) or LoraModule}: what the host tier holds."""
    total = 0
    for value in placed.values():
        for tensor in (value.a, value.b) if isinstance(value, LoraModule) else value:
            total += tensor.numel() * tensor.element_size()
    return total


def _safe(name: str) -> bool:
    try:
        validate_adapter_id(name)
        return True
    except LoraplexError:
        return False


def _read_json(path: Path, adapter_id: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterRejected(f"adapter '{adapter_id}': {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterRejected(f"adapter '{adapter_id}': {path.name} is not a JSON object")
    return data
