"""Save and load a wrapped model's adapters: safetensors plus a JSON manifest, never pickle.

A directory holds

- ``share_config.json``, the manifest: format version, method, the method's config, per layer
  its ``in_features`` / ``out_features``, the kwargs that rebuild it, its tensor shapes and
  dtypes, the task names in task-id order, the id of the subspace (a hash of the shared
  tensors), and for every data file its path, size and SHA-256; the manifest carries the
  SHA-256 of its own content too;
- version folders ``v-<random>/`` holding the data files, which are never changed once written:
  ``shared.safetensors`` (what all tasks share, e.g. Share's ``<layer>.U``, ``<layer>.V``) and
  ``task-<name>.safetensors`` (one task's own part, a few KB for Share).

A save is one commit, as in a storage engine: the new data files go to a fresh version folder
(written, fsynced, folder fsynced), then a new manifest is written to a temporary file, fsynced
and swapped in by one ``os.replace`` (the commit point), and the directory is fsynced. Files the
new manifest still uses (an unchanged ``shared.safetensors``, tasks kept from an earlier save)
stay where they are and are referenced, not rewritten. Whatever instant a save dies, the
manifest on disk is the old one or the new one, each pointing only at complete, fsynced files;
files no manifest refers to (a dead save's folder, temporaries, replaced versions) are deleted by
the next save. One writer per directory at a time (an advisory lock serializes saves).

``load_adapters`` reads every file whole into memory (tensors own their memory: no mapping of
the file), checks its SHA-256, dtypes, shapes and finiteness against the manifest, and raises a
``ValueError`` naming the file (and the tensor) for anything that does not fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save

from ..nn.common import check_task_name, is_adaptable, layer_features
from .method import get_method, make_config
from .wrap import CONFIG_ATTR, adapter_layers, model_method, replace_linears

FORMAT = "share_kernels.adapters"
#: 2: version folders + digests in the manifest; 1 (read only): files next to the config
FORMAT_VERSION = 2
CONFIG_FILE = "share_config.json"
SHARED_FILE = "shared.safetensors"
LOCK_FILE = ".share_lock"
_VERSION_DIR = re.compile(r"v-[0-9a-f]{16}")
_TMP_SUFFIX = ".tmp"


def task_file(name: str) -> str:
    return f"task-{name}.safetensors"


# ------------------------------------------------------------------------- durable file writes


def _fsync_dir(path: str) -> None:
    """Flush a directory's entries (a created, renamed or deleted name) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, rename it to ``path``, fsync
    the folder: afterwards ``path`` holds the old content or the new one, never a mix."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}{_TMP_SUFFIX}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # safetensors' save() to bytes, not save_file(): save_file creates files readable by the owner alone.
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def _save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, _tensor_bytes(tensors, metadata))


@contextlib.contextmanager
def _locked(directory: str, shared: bool = False) -> Iterator[None]:
    """An advisory lock on ``directory``: exclusive for a save, shared for a load (so a save's
    clean-up never deletes files a load is reading). A no-op where ``fcntl`` is missing, or for
    a load of a directory without a lock file (read-only copies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY) if shared else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------- manifest


def _subspace_id(shared: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(shared):
        t = shared[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _manifest_digest(cfg: dict) -> str:
    body = {k: v for k, v in cfg.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _model_tasks(layers: dict[str, nn.Module]) -> list[str]:
    lists = {name: layer.tasks for name, layer in layers.items()}
    first_name, first = next(iter(lists.items()))
    for name, tasks in lists.items():
        if tasks != first:
            raise ValueError(f"layers disagree on the tasks: {first_name!r} has {first}, {name!r} has {tasks}")
    return first


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _read_config(directory: str) -> dict:
    """The manifest of ``directory``, parsed and checked; ValueError naming the file otherwise."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {CONFIG_FILE}; it was not written by save_adapters")
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(cfg).__name__}")
    if cfg.get("format") != FORMAT or cfg.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{path}: expected format {FORMAT!r} version 1 or {FORMAT_VERSION}; got {cfg.get('format')!r} "
            f"version {cfg.get('version')!r}"
        )
    if cfg["version"] >= 2 and cfg.get("manifest_sha256") != _manifest_digest(cfg):
        raise ValueError(f"{path}: the manifest's content does not match its SHA-256 (the file was changed or damaged)")
    try:
        _check_manifest(cfg)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return cfg


def _check_manifest(cfg: dict) -> None:
    """Types and names of the manifest's fields (a path must stay inside the directory)."""
    for key, kind in (("method", str), ("config", dict), ("subspace", str), ("tasks", list), ("layers", dict)):
        if not isinstance(cfg[key], kind):
            raise TypeError(f"{key!r} must be a {kind.__name__}")
    if not cfg["layers"]:
        raise ValueError("no layers")
    for t in cfg["tasks"]:
        check_task_name(t)
    if len(set(cfg["tasks"])) != len(cfg["tasks"]):
        raise ValueError(f"duplicate task names in {cfg['tasks']}")
    for n, spec in cfg["layers"].items():
        for key in ("in_features", "out_features"):
            if not isinstance(spec[key], int):
                raise TypeError(f"layer {n!r}: {key} must be an int")
        if not isinstance(spec["layer_config"], dict) or not isinstance(spec["shared"], dict):
            raise TypeError(f"layer {n!r}: layer_config and shared must be objects")
    if cfg["version"] >= 2:
        names = [SHARED_FILE] + [task_file(t) for t in cfg["tasks"]]
        if sorted(cfg["files"]) != sorted(names):
            raise ValueError(f"'files' must list exactly {names}; got {sorted(cfg['files'])}")
        for name, entry in cfg["files"].items():
            folder, _, base = str(entry["path"]).partition("/")
            if base != name or not _VERSION_DIR.fullmatch(folder):
                raise ValueError(f"file {name!r}: path {entry['path']!r} is not v-<16 hex digits>/{name}")
            if not isinstance(entry["sha256"], str) or not isinstance(entry["bytes"], int):
                raise TypeError(f"file {name!r}: sha256 must be a str and bytes an int")


def saved_files(directory: Union[str, os.PathLike]) -> dict[str, str]:
    """``{file name: path}`` of the data files the manifest of ``directory`` uses."""
    directory = os.fspath(directory)
    return _paths(directory, _read_config(directory))


def _paths(directory: str, cfg: dict) -> dict[str, str]:
    if cfg["version"] == 1:
        names = [SHARED_FILE] + [task_file(t) for t in cfg["tasks"]]
        return {n: os.path.join(directory, n) for n in names}
    return {n: os.path.join(directory, *e["path"].split("/")) for n, e in cfg["files"].items()}


def _collect_garbage(directory: str, keep: set[str], legacy: bool) -> None:
    """Delete what no manifest refers to: files in version folders outside ``keep`` (relative
    paths), empty version folders, temporaries, and (``legacy``: the manifest on disk is
    version 2) the data files of a version-1 layout."""
    for entry in os.listdir(directory):
        full = os.path.join(directory, entry)
        if _VERSION_DIR.fullmatch(entry) and os.path.isdir(full):
            for f in os.listdir(full):
                if f"{entry}/{f}" not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(full, f))
            if not os.listdir(full):
                with contextlib.suppress(OSError):
                    os.rmdir(full)
        elif (entry.startswith(".") and entry.endswith(_TMP_SUFFIX)) or (
            legacy and entry.endswith(".safetensors") and (entry == SHARED_FILE or entry.startswith("task-"))
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)


# ------------------------------------------------------------------------- save


def save_adapters(model: nn.Module, directory: str, tasks: Optional[Sequence[str]] = None) -> None:
    """Write the adapters of a wrapped ``model`` to ``directory`` (created if needed), as one commit.

    ``tasks``: which tasks get a (new) file (default all). A task saved earlier in the directory
    stays listed when its file was saved against the same shared tensors; one that no longer fits
    is dropped from the listing with a warning. The next load sees the complete previous state or
    the complete new one, whenever this call dies (see the module doc).
    """
    method, config, layers = model_method(model)
    model_tasks = _model_tasks(layers)
    if tasks is None:
        tasks = list(model_tasks)
    elif isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"save_adapters: tasks must be a list of task names; got {tasks!r}")
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in model_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the model has tasks {model_tasks}")
    shared_by_layer = {n: layer.shared_tensors() for n, layer in layers.items()}
    shared = {f"{n}.{k}": v for n, ts in shared_by_layer.items() for k, v in ts.items()}
    per_task = {
        t: {f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.task_tensors(t).items()} for t in tasks
    }
    for where, tensors in [(SHARED_FILE, shared)] + [(task_file(t), ts) for t, ts in per_task.items()]:
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"save_adapters: {where}: tensor {k!r} holds NaN or infinite values")
    sid = _subspace_id(shared)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)

    with _locked(directory):
        previous = _read_config(directory) if os.path.exists(os.path.join(directory, CONFIG_FILE)) else None
        prev_files = previous.get("files", {}) if previous and previous["version"] >= 2 else {}
        # a dead save's leftovers: everything the current manifest does not use
        _collect_garbage(directory, {e["path"] for e in prev_files.values()}, legacy=bool(prev_files))

        kept: list[str] = []
        if previous is not None:
            listed = [t for t in previous["tasks"] if t not in tasks]
            if previous["method"] == method.name and previous["subspace"] == sid and previous["version"] >= 2:
                kept = listed
            elif listed:
                warnings.warn(
                    f"{directory}: task files {[task_file(t) for t in listed]} were saved against other shared "
                    "tensors (or in the version-1 layout) and are no longer listed",
                    stacklevel=2,
                )
        order = [t for t in model_tasks if t in tasks or t in kept] + [t for t in kept if t not in model_tasks]

        version = f"v-{secrets.token_hex(8)}"
        folder = os.path.join(directory, version)
        os.mkdir(folder)
        meta = {"format": FORMAT, "method": method.name, "subspace": sid}
        files = {t_name: prev_files[t_name] for t_name in map(task_file, kept)}
        writes = [(task_file(t), tensors, {**meta, "task": t}) for t, tensors in per_task.items()]
        if previous is not None and previous["subspace"] == sid and SHARED_FILE in prev_files:
            files[SHARED_FILE] = prev_files[SHARED_FILE]  # unchanged bases: a new task ships alone
        else:
            writes.insert(0, (SHARED_FILE, shared, meta))
        for name, tensors, md in writes:
            data = _tensor_bytes(tensors, md)
            _write_synced(os.path.join(folder, name), data)
            files[name] = {"path": f"{version}/{name}", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _fsync_dir(folder)

        # Every task of a layer has the same tensor shapes; any task of the model shows them.
        shape_task = model_tasks[0] if model_tasks else None
        layer_specs = {}
        for n, layer in layers.items():
            task_t = None if shape_task is None else layer.task_tensors(shape_task)
            layer_specs[n] = {
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "layer_config": layer.adapter_config(),
                "shared": {k: list(v.shape) for k, v in shared_by_layer[n].items()},
                "task": None if task_t is None else {k: list(v.shape) for k, v in task_t.items()},
                "shared_dtypes": {k: _dtype_name(v) for k, v in shared_by_layer[n].items()},
                "task_dtypes": None if task_t is None else {k: _dtype_name(v) for k, v in task_t.items()},
            }
        cfg = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": method.name,
            "config": dataclasses.asdict(config),
            "subspace": sid,
            "tasks": order,
            "layers": layer_specs,
            "files": {n: files[n] for n in [SHARED_FILE] + [task_file(t) for t in order]},
        }
        cfg["manifest_sha256"] = _manifest_digest(cfg)
        # The commit. If it raises, what it left is cleaned by the next save, which reads the
        # manifest then on disk (whether or not the rename took place).
        atomic_write(os.path.join(directory, CONFIG_FILE), json.dumps(cfg, indent=2).encode())
        _collect_garbage(directory, {e["path"] for e in cfg["files"].values()}, legacy=True)
        _fsync_dir(directory)


# ------------------------------------------------------------------------- load


def _split(
    tensors: dict[str, torch.Tensor], layer_shapes: dict[str, dict], where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<layer>.<tensor>": t}`` -> ``{layer: {tensor: t}}``, checked against ``layer_shapes``."""
    expected = {f"{n}.{k}": tuple(s) for n, shapes in layer_shapes.items() for k, s in shapes.items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: missing tensors {missing[:8]}, unexpected tensors {extra[:8]}")
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layer_shapes}
    for n, shapes in layer_shapes.items():
        for k in shapes:
            t = tensors[f"{n}.{k}"]
            if tuple(t.shape) != expected[f"{n}.{k}"]:
                raise ValueError(
                    f"{where}: layer {n!r}, tensor {k!r}: expected shape {expected[f'{n}.{k}']}, got {tuple(t.shape)}"
                )
            out[n][k] = t
    return out


def _read_tensors(
    path: str, sid: str, where: str, entry: Optional[dict], dtypes: dict[str, str], task: Optional[str]
) -> dict[str, torch.Tensor]:
    """The tensors of one data file, read whole (they own their memory) and verified: size and
    SHA-256 against the manifest ``entry`` (version 2), the subspace id and task name in the
    file's metadata, each tensor's dtype against ``dtypes`` and floating values finite."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: file {path} is missing") from None
    except OSError as e:
        raise ValueError(f"{where}: file {path} cannot be read ({e})") from None
    if entry is not None:
        if len(data) != entry["bytes"]:
            raise ValueError(
                f"{where}: {path} has {len(data)} bytes, the manifest says {entry['bytes']} (truncated or damaged)"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{where}: {path} does not match the SHA-256 in the manifest (the file is damaged)")
    try:
        tensors = st_load(data)
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as e:  # SafetensorError, a bad header
        raise ValueError(f"{where}: {path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    if metadata.get("subspace") != sid:
        raise ValueError(
            f"{where}: {os.path.basename(path)} was saved against other shared tensors (subspace "
            f"{metadata.get('subspace')!r}, the config says {sid!r})"
        )
    if task is not None and metadata.get("task", task) != task:
        raise ValueError(f"{where}: {path} holds task {metadata.get('task')!r}, the manifest lists it as {task!r}")
    for key, t in tensors.items():
        want = dtypes.get(key)
        if want is not None and _dtype_name(t) != want:
            raise ValueError(f"{where}: {path}: tensor {key!r} has dtype {_dtype_name(t)}, the manifest says {want}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {path}: tensor {key!r} holds NaN or infinite values")
        if not (t.is_floating_point() or t.dtype == torch.int64):
            raise ValueError(f"{where}: {path}: tensor {key!r} has dtype {_dtype_name(t)}, not a float (or int64) one")
    return tensors


def _spec(cfg: dict, where: str):
    """Per-layer shapes and dtypes of the shared and task files from the manifest."""
    try:
        saved = cfg["layers"]
        shared_shapes = {n: spec["shared"] for n, spec in saved.items()}
        task_shapes = {n: spec["task"] or {} for n, spec in saved.items()}
        shared_dtypes, task_dtypes = (
            {f"{n}.{k}": d for n, spec in saved.items() for k, d in (spec.get(key) or {}).items()}
            for key in ("shared_dtypes", "task_dtypes")
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: malformed layer entries ({type(e).__name__}: {e})") from None
    if cfg["version"] >= 2 and cfg["tasks"] and not (shared_dtypes and task_dtypes):
        raise ValueError(f"{where}: the manifest lacks the tensors' dtypes")
    return shared_shapes, task_shapes, shared_dtypes, task_dtypes


def load_adapters(model: nn.Module, directory: str) -> list[str]:
    """Load adapters saved by :func:`save_adapters` into ``model``; returns the task names.

    An unwrapped model is wrapped first (the saved layer names, the saved config); a wrapped one
    must have the same layers, built the same way. Everything is checked before anything is
    changed: the manifest's and every file's SHA-256, a missing or unexpected layer or tensor, a
    dtype other than the saved one, NaN or infinite values, a shape that does not fit (named with
    the expected and found shapes), or a task file from other bases raises ValueError naming the
    file. The loaded tasks replace the model's; the base model is active afterwards.
    """
    directory = os.fspath(directory)
    with _locked(directory, shared=True):
        cfg = _read_config(directory)
        cfg_path = os.path.join(directory, CONFIG_FILE)
        try:
            method = get_method(cfg["method"])
            config = make_config(method, cfg["config"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        saved = cfg["layers"]
        layers = adapter_layers(model)
        modules = dict(model.named_modules())
        if layers:
            missing, extra = sorted(set(saved) - set(layers)), sorted(set(layers) - set(saved))
            if missing or extra:
                raise ValueError(
                    f"adapter layers differ: saved but not in the model {missing}, in the model but not saved {extra}"
                )
        for n, spec in saved.items():
            m = modules.get(n)
            if m is None or not (is_adaptable(m) or isinstance(m, method.layer_cls)):
                kinds = f"nn.Linear, Conv1D or {method.layer_cls.__name__}"
                raise ValueError(f"layer {n!r}: the model has no {kinds} by that name")
            if layer_features(m) != (spec["in_features"], spec["out_features"]):
                raise ValueError(
                    f"layer {n!r}: expected in_features={spec['in_features']}, out_features={spec['out_features']}; "
                    f"got {', '.join(map(str, layer_features(m)))}"
                )
            if layers and m.adapter_config() != spec["layer_config"]:
                raise ValueError(
                    f"layer {n!r}: saved with {spec['layer_config']}, the model's layer has {m.adapter_config()}"
                )
        in_model = _model_tasks(layers) if layers else []
        stray = [t for t in in_model if t not in cfg["tasks"]]
        if stray:
            raise ValueError(
                f"the model holds tasks {stray} that {directory!r} lacks; they would not fit the loaded bases"
            )

        sid = cfg["subspace"]
        shared_shapes, task_shapes, shared_dtypes, task_dtypes = _spec(cfg, cfg_path)
        paths = _paths(directory, cfg)
        entries = cfg.get("files", {})
        shared = _split(
            _read_tensors(paths[SHARED_FILE], sid, SHARED_FILE, entries.get(SHARED_FILE), shared_dtypes, None),
            shared_shapes,
            SHARED_FILE,
        )
        per_task = {}
        for t in cfg["tasks"]:
            name = task_file(t)
            per_task[t] = _split(
                _read_tensors(paths[name], sid, name, entries.get(name), task_dtypes, t), task_shapes, name
            )

    if not layers:
        try:
            replace_linears(model, method.layer_cls, {n: spec["layer_config"] for n, spec in saved.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{cfg_path}: the saved layer_config does not build a {method.layer_cls.__name__}: {e}"
            ) from None
        model.requires_grad_(False)
        layers = adapter_layers(model)
    for n, layer in layers.items():
        try:
            layer.load_adapter_state(shared[n], {t: per_task[t][n] for t in cfg["tasks"]})
        except ValueError as e:
            raise ValueError(f"{directory}: layer {n!r}: {e}") from None
    setattr(model, CONFIG_ATTR, config)
    return list(cfg["tasks"])
