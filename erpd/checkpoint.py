"""Checkpoints that are either complete or absent.

A model checkpoint is a directory that `AutoModelForCausalLM.from_pretrained` loads (merged
safetensors + config + tokenizer) plus `manifest.json`, written last, that records what produced it
and the sha256 of every file. Everything is written into a temporary sibling directory and moved
into place with one `os.replace`, so a crash mid-write leaves the previous state intact. Resume
state (optimizer, RNG, step) is safetensors + JSON too: nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from erpd import distributed
from erpd.digest import MANIFEST, hash_files, tree_sha256
from erpd.digest import file_sha256 as file_sha256  # re-exported: callers import it from here
from erpd.errors import CheckpointError

FORMAT_VERSION = 1
RESUME_DIR = "resume"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_replaceable(path: str | Path, marker: str) -> None:
    """Refuse to overwrite anything but an empty directory or an artefact of the same kind.

    `marker` is the file that identifies the kind (manifest.json, rollout.json): a typo in
    --out must never replace a user's file, a device node or some other run's directory.
    """
    final = Path(path)
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir() or final.is_symlink():
        raise CheckpointError(f"{final}: exists and is not a directory; refusing to replace it")
    if any(final.iterdir()) and not (final / marker).is_file():
        raise CheckpointError(f"{final}: not empty and not an erpd output; refusing to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces `path` in one rename, on error it is removed.

    An existing `path` is first renamed aside and deleted only after the new one is in place, so
    at every instant `path` is either the old complete directory or the new complete one (a
    crash between the two renames leaves `path` absent and the old copy under `.old-*`). Only an
    empty directory or one holding `marker` (the same kind of artefact) is ever replaced.
    """
    final = Path(path)
    check_replaceable(final, marker)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CheckpointError(f"{final.parent}: is not a directory") from exc
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hash_files(root: Path) -> dict[str, str]:
    return hash_files(root)


def save_model_checkpoint(
    path: str | Path, model: Any, tokenizer: Any, manifest: Mapping[str, Any]
) -> str:
    """Save model + tokenizer + manifest atomically; returns the checkpoint's sha256.

    A sharded model is gathered to rank 0, which alone writes: every rank must call this, and
    the checkpoint is one merged directory whichever way the model was trained."""
    weights = None
    if distributed.is_sharded(model):
        weights = distributed.full_state_dict(model)
        if getattr(model.config, "tie_word_embeddings", False):  # stored once, as unsharded
            head = model.get_output_embeddings()
            weights = {
                k: v for k, v in weights.items() if k not in _names_of(model, head, "weight")
            }
    sha = None
    if distributed.is_main():
        sha = _save_model(Path(path), model, tokenizer, manifest, weights)
    return str(distributed.from_main(sha))


def _names_of(model: Any, module: Any, attr: str) -> set[str]:
    return {f"{name}.{attr}" for name, m in model.named_modules() if m is module}


def _save_model(
    path: Path,
    model: Any,
    tokenizer: Any,
    manifest: Mapping[str, Any],
    weights: dict[str, torch.Tensor] | None,
) -> str:
    for name, tensor in (weights if weights is not None else model.state_dict()).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name} is not finite; refusing to save it")
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        files = _hash_files(tmp)
        sha = tree_sha256(files)
        body = {
            "format": FORMAT_VERSION,
            "created_at": time.time(),
            **manifest,
            "files": files,
            "sha256": sha,
        }
        (tmp / MANIFEST).write_text(json.dumps(finite_json(body), indent=2, default=str))
    return sha


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None: JSON has none, and a store
    that parses the manifest (Postgres json) refuses the file otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not an erpd checkpoint)")
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc.msg})") from exc
    return data


def verify_checkpoint(path: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check every file against the manifest (and the whole against a pinned digest)."""
    root = Path(path)
    manifest = read_manifest(root)
    recorded: dict[str, str] = manifest.get("files", {})
    actual = _hash_files(root)
    if actual != recorded:
        changed = sorted(set(actual.items()) ^ set(recorded.items()))
        raise CheckpointError(f"{root}: files differ from the manifest ({changed[0][0]})")
    sha = tree_sha256(actual)
    if expected_sha256 is not None and sha != expected_sha256:
        raise CheckpointError(
            f"{root}: sha256 {sha[:12]} does not match pinned {expected_sha256[:12]}"
        )
    return manifest


def parent_record(path: str | Path) -> dict[str, object]:
    """Lineage entry for a model directory: its path and, for erpd checkpoints, its sha256."""
    try:
        sha = read_manifest(path).get("sha256")
    except CheckpointError:  # a plain HF directory has no manifest: lineage records the path
        sha = None
    return {"path": str(path), "sha256": sha}


# --- resume state ---------------------------------------------------------------------------
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_resume(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write `run_dir/resume/step-XXXXXXXX` atomically and keep only the newest `keep`."""
    if keep < 1:
        raise ValueError("keep must be >= 1: the checkpoint just written is always kept")
    root = Path(run_dir) / RESUME_DIR
    target = root / f"step-{step:08d}"
    sharded = distributed.is_sharded(model)
    model_tensors: dict[str, torch.Tensor] = {}
    if sharded:  # every rank writes its shards of the weights and AdamW state
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta: dict[str, Any] = {"sharded": True}
    else:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        # copy=True: tied weights (lm_head = embed_tokens, as in Qwen3) share storage on CPU, and
        # safetensors refuses shared tensors; loading re-ties them because both names are restored
        model_tensors = {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
        }
    extra = {f"extra.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    with distributed.main_writes(atomic_dir(target)) as tmp:
        if sharded:
            distributed.save_shards(tmp, model, optimizer)  # returns once every rank has written
        if distributed.is_main():
            if not sharded:
                save_file(model_tensors, str(tmp / "model.safetensors"))
            save_file({**opt_tensors, **extra, **rng}, str(tmp / "state.safetensors"))
            body = {"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta, **(meta or {})}
            (tmp / "state.json").write_text(json.dumps(body, default=str))
            files = _hash_files(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"files": files, "sha256": tree_sha256(files)}))
    if distributed.is_main():
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return target


def latest_resume(run_dir: str | Path) -> Path | None:
    """Newest complete resume checkpoint (one with a manifest), or None."""
    root = Path(run_dir) / RESUME_DIR
    done = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
    return done[-1] if done else None


def read_resume_meta(path: str | Path) -> dict[str, Any]:
    """The JSON part of a resume checkpoint (step, fingerprint, ...), without loading tensors."""
    try:
        meta: dict[str, Any] = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable resume state") from exc
    return meta


def load_resume(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model, optimizer and RNG in place; returns (step, extra tensors, meta)."""
    root = Path(path)
    verify_checkpoint(root)
    meta = json.loads((root / "state.json").read_text())
    tensors = load_file(str(root / "state.safetensors"), device="cpu")
    if (root / distributed.SHARDS).is_dir():  # DCP reshards: any world size may load it
        distributed.load_shards(root, model, optimizer)
    elif distributed.is_sharded(model):
        raise CheckpointError(
            f"{root}: written by a single process; resume it with runtime.gpus=1, or start over"
        )
    else:
        device = next(model.parameters()).device
        model.load_state_dict(load_file(str(root / "model.safetensors"), device=str(device)))
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return int(meta["step"]), extra, meta
