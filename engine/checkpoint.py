"""Checkpoints: one .npz file per save, written atomically, verified when read.

A checkpoint holds named float arrays (parameters, optimizer state, the BN statistics) and
a JSON header (`meta`): what run it belongs to (arch, layout signature, data set, global
batch, seed: the run identity; headers written before issue 20 held ranks and images per
rank instead, read as their product),
where training stands (epoch, step, global step: the data position and the schedule's
fractional epoch), the loader's and the run's random state (all randomness in a run is
counter-based, derived from the seed and the position, so seed + position IS the random
state). Every array is a zip member with its own CRC-32, checked when it is read.

Writing: a temporary file in the target directory, flushed and fsync'ed, renamed over
the final name, then the directory fsync'ed; a crash at any point leaves either the old
file or the new one, never a torn one. Older checkpoints are pruned only after the new
one is durable, so the previous good checkpoint always survives a failed write.

Names: ckpt-<global step>-<run id>.npz, the run id a hash of the run identity (run_id), so
runs sharing a directory never write to one name; ckpt-<global step>.npz, the name before
issue 20, is still listed and read.

Reading: a truncated, corrupt or foreign file raises CheckpointError naming the file;
resuming from a directory takes the newest checkpoint of the run that verifies and names
the ones it skipped. Pruning keeps the newest checkpoints of one run, recognised by the run
identity in each header, so runs sharing a directory never delete each other's.

Conv weight layout. Conv weights are OHWI (Cout, KH, KW, Cin) since issue 17 (cuDNN's
filter layout for NHWC); checkpoints written before hold them HWIO (KH, KW, Cin, Cout),
in the flat parameters and in every flat optimizer buffer, and carry the layout signature
of that time. Each header now says `conv_weights: "OHWI"`. `check_compatible(...,
layout=)` accepts an old checkpoint of the same model (its signature equals
layout.hwio_signature()), and `upgrade_conv_layout` transposes its conv slots on load;
without `layout=`, such a checkpoint is refused with a message naming the change.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile

import numpy as np

from engine.errors import EngineError

FORMAT = "engine-checkpoint-1"
CONV_WEIGHTS = "OHWI"           # the conv weight layout of the flat arrays, in each header
# ckpt-<global step>-<run id>.npz; ckpt-<global step>.npz is the name before issue 20 (still read).
_NAME = re.compile(r"^ckpt-(\d{8})(?:-([0-9a-f]{8}))?\.npz$")


class CheckpointError(EngineError):
    """A checkpoint cannot be used: unreadable, truncated, corrupt, or from another run."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: str, arrays: dict, meta: dict) -> None:
    """Atomically write `arrays` (name -> numpy array) and `meta` (JSON-able) to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    header = dict(meta, format=FORMAT, conv_weights=CONV_WEIGHTS)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of the checkpoint at `path`, verified; CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt checkpoint ({type(e).__name__}: {e})") from e
    raw = arrays.pop("__meta__", None)
    try:
        meta = json.loads(raw.tobytes().decode()) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this engine (no valid header)")
    return arrays, _with_global_batch(meta)


def _with_global_batch(meta: dict) -> dict:
    """A header written before the run identity named the global batch (issue 20) carries
    ranks x images per rank instead: the same run, whatever rank count continues it."""
    if "global_batch" not in meta and isinstance(meta.get("world_size"), int) \
            and isinstance(meta.get("batch_per_rank"), int):
        return dict(meta, global_batch=meta["world_size"] * meta["batch_per_rank"])
    return meta


def check_compatible(path: str, meta: dict, expected: dict, layout=None) -> None:
    """Refuse a checkpoint whose run description differs from the current run's. With
    `layout` (the model's FlatLayout), a checkpoint of the same model in the old HWIO conv
    layout is accepted: load it through upgrade_conv_layout."""
    for key, want in expected.items():
        have = meta.get(key)
        if have == want:
            continue
        if key == "layout" and _is_hwio(meta):
            if layout is not None and have == layout.hwio_signature():
                continue
            raise CheckpointError(f"{path}: checkpoint was written before conv weights changed layout from "
                                  f"HWIO (KH, KW, Cin, Cout) to OHWI (Cout, KH, KW, Cin) (issue 17), "
                                  + ("and not for this model; " if layout is not None else
                                     "and this run cannot convert it; ")
                                  + f"its layout={have!r}, this run has layout={want!r}; refusing to resume from it")
        raise CheckpointError(f"{path}: checkpoint was written with {_differences(meta, {key: want})[0]}; "
                              f"refusing to resume from it")


def _differences(meta: dict, expected: dict) -> list:
    """'key=had, this run has key=wants' for each key of `expected` the header differs on; a
    global batch says how to keep it at another rank count."""
    out = []
    for key, want in expected.items():
        have = meta.get(key)
        if have == want:
            continue
        text = f"{key}={have!r}, this run has {key}={want!r}"
        if key == "global_batch" and "world_size" in meta:
            text += (f" ({meta['world_size']} ranks x {meta.get('batch_per_rank')} images per rank; a job of "
                     f"another rank count continues the run with --batch-per-rank {have} / ranks)")
        out.append(text)
    return out


def _is_hwio(meta: dict) -> bool:
    """Whether a checkpoint's header predates the OHWI conv layout."""
    return meta.get("conv_weights", "HWIO") == "HWIO"


def upgrade_conv_layout(path: str, arrays: dict, meta: dict, layout, say=print) -> tuple[dict, dict]:
    """(arrays, meta) of a loaded checkpoint with conv weights in this engine's OHWI layout.

    A checkpoint already in it comes back as it is. One written in the old HWIO layout for
    `layout`'s model (header signature == layout.hwio_signature()) is converted: each conv
    (4-d) slot of every flat array ("params" and the optimizer's buffers, "optimizer.d",
    "optimizer.m", ...) is transposed (KH, KW, Cin, Cout) -> (Cout, KH, KW, Cin), and the
    header's layout signatures (the run's and the optimizer state's) are set to the new
    one; `say` gets one message. Anything else raises CheckpointError."""
    new, old = layout.signature(), layout.hwio_signature()
    have = meta.get("layout")
    if not _is_hwio(meta) or have == new:
        return arrays, meta
    if have != old:
        raise CheckpointError(f"{path}: checkpoint in the old HWIO conv layout was not written for this "
                              f"model (layout={have!r}); cannot convert it")
    convs = [s for s in layout.slots if len(s.shape) == 4]
    out, converted = dict(arrays), []
    for key, array in arrays.items():
        if not (key == "params" or key.startswith("optimizer.")):
            continue
        if array.shape != (layout.total,):
            raise CheckpointError(f"{path}: {key} has shape {array.shape}, expected ({layout.total},)")
        flat = array.copy()
        for s in convs:
            cout, kh, kw, cin = s.shape
            flat[s.offset:s.stop] = array[s.offset:s.stop].reshape(kh, kw, cin, cout).transpose(3, 0, 1, 2).ravel()
        out[key] = flat
        converted.append(key)
    meta = dict(meta, layout=new, conv_weights=CONV_WEIGHTS)
    opt = meta.get("optimizer_state")
    if isinstance(opt, dict) and opt.get("layout") == old:
        meta["optimizer_state"] = dict(opt, layout=new)
    say(f"{path}: converted the checkpoint's conv weights from the old HWIO layout to OHWI "
        f"({len(convs)} conv slots in {', '.join(converted)})")
    return out, meta


def run_id(identity: dict) -> str:
    """Eight hex digits naming the run `identity` in its checkpoints' file names, so that
    runs sharing a directory never write to the same name."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def path_for(directory: str, global_step: int, run: str | None = None) -> str:
    """The checkpoint of `global_step` of the run whose run_id is `run` (None: the name
    checkpoints had before issue 20, which carried the step only)."""
    return os.path.join(directory, f"ckpt-{global_step:08d}" + (f"-{run}" if run else "") + ".npz")


def list_checkpoints(directory: str) -> list:
    """Checkpoint files in `directory` (of every run), oldest step first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return [os.path.join(directory, n) for _, n in sorted(found)]


def of_run_by_name(paths: list, identity: dict) -> list:
    """The checkpoints among `paths` that may belong to the run `identity`: those named with
    its run_id, and those of the old names (no run id) whose header matches it or cannot be
    read (a damaged file is reported when it is tried, not silently passed over). The layout
    signature of an old name is left to check_compatible: it may be the HWIO one it converts."""
    mine, out = run_id(identity), []
    for p in paths:
        m = _NAME.match(os.path.basename(p))
        if m.group(2) == mine or (m.group(2) is None and ((meta := read_meta(p)) is None or all(
                meta.get(k) == v for k, v in identity.items() if k != "layout"))):
            out.append(p)
    return out


def read_meta(path: str) -> dict | None:
    """The JSON header of a checkpoint, reading only that member; None if it has none."""
    try:
        with zipfile.ZipFile(path) as z, z.open("__meta__.npy") as f:
            meta = json.loads(np.lib.format.read_array(f, allow_pickle=False).tobytes().decode())
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, UnicodeDecodeError):
        return None
    return _with_global_batch(meta) if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def of_run(paths: list, identity: dict) -> list:
    """The checkpoints among `paths` whose header matches the run `identity` on every key;
    files of other runs, and files whose header cannot be read, are left out."""
    return [p for p in paths
            if (meta := read_meta(p)) is not None and all(meta.get(k) == v for k, v in identity.items())]


def newest_intact(resume: str, identity: dict | None = None) -> tuple[str, dict, dict, list]:
    """(path, arrays, meta, skipped) of --resume FILE, or of the newest checkpoint of --resume
    DIR that verifies; `skipped` holds the CheckpointError of each newer one that did not.
    With `identity`, only the checkpoints of that run in DIR are candidates (of_run_by_name);
    a DIR holding only other runs' checkpoints raises, naming what differs in the newest."""
    if os.path.isdir(resume):
        candidates = list_checkpoints(resume)[::-1]
        if not candidates:
            raise CheckpointError(f"{resume}: --resume names a directory without checkpoints (ckpt-*.npz)")
        if identity is not None:
            foreign, candidates = candidates, of_run_by_name(candidates, identity)
            if not candidates:
                differ = "; ".join(_differences(read_meta(foreign[0]) or {}, identity)[:3])
                raise CheckpointError(f"{resume}: no checkpoint of this run there ({len(foreign)} of other runs; "
                                      f"the newest, {foreign[0]}, was written with {differ})")
    elif os.path.exists(resume):
        candidates = [resume]
    else:
        raise CheckpointError(f"{resume}: --resume names no file or directory")
    skipped = []
    for path in candidates:
        try:
            arrays, meta = load(path)
        except CheckpointError as e:
            skipped.append(e)
            continue
        return path, arrays, meta, skipped
    if len(candidates) == 1:
        raise skipped[0]
    raise CheckpointError(f"{resume}: no checkpoint there verifies:" + "".join(f"\n  {e}" for e in skipped))


def remove_stale_temps(directory: str) -> list:
    """Delete the temporary files (.tmp-*) a killed save left; call it only while holding the
    run directory's lock, so no live save of another job is touched. Returns their paths."""
    if not os.path.isdir(directory):
        return []
    stale = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(".tmp-")]
    for p in stale:
        os.unlink(p)
    return stale


def prune(directory: str, keep: int, identity: dict) -> None:
    """Delete all but the newest `keep` checkpoints of the run `identity` (called after a save
    is durable). Files of other runs, and files whose header cannot be read, are left alone."""
    for p in of_run(list_checkpoints(directory), identity)[:-keep]:
        os.unlink(p)
