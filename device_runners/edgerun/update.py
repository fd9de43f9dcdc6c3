"""Receiving a new bundle version: keep the personal head, or re-adapt when the backbone changed.

A personal head (``STATE/head.npz``, written by ``adapt``) records the sha256 of the backbone
it was trained on. A new bundle with the *same* backbone (e.g. a fleet-aggregated head,
manifest ``version`` n+1) leaves the personal head valid: it is kept. A new backbone makes the
personal head meaningless (other features): the device re-adapts from the new bundle's head
when it still has its local data, else falls back to the shipped head, and says which. Either
way the old head is kept beside it as ``head.<backbone sha[:12]>.npz``.
"""

from __future__ import annotations

import json
import os

from edgerun import RunnerError, copy_durable
from edgerun.bundle import Bundle
from edgerun.files import MAX_HEAD_BYTES, read_npz
from edgerun.head import Head

STATE_FILE = "bundle.json"


def bundle_record(bundle: Bundle) -> dict:
    """The version facts of a bundle a device keeps in ``STATE/bundle.json``."""
    m = bundle.manifest
    return {"version": int(m["version"]), "parent": m["parent"],
            "manifest_sha256": bundle.manifest_sha256,
            "backbone_sha256": m["files"]["backbone"]["sha256"], "name": m["name"]}


def _head_meta(path: str) -> dict:
    z = read_npz(path, "head checkpoint", MAX_HEAD_BYTES)
    try:
        meta = json.loads(str(z["__meta__"]))
    except (ValueError, KeyError) as e:
        raise RunnerError(f"{path} is not a readable head checkpoint ({e})") from None
    if not isinstance(meta, dict):
        raise RunnerError(f"{path} is not a readable head checkpoint (bad __meta__)")
    return meta


def update(bundle_dir: str, state_dir: str, **kw) -> dict:
    """:func:`update_unlocked` holding the state folder's lock (one run at a time)."""
    from edgerun.files import state_lock

    with state_lock(state_dir):
        return update_unlocked(bundle_dir, state_dir, **kw)


def update_unlocked(bundle_dir: str, state_dir: str, *, data_path: str | None = None,
                    trust_key: str | None = None, allow_downgrade: bool = False,
                    quiet: bool = False, **adapt_kw) -> dict:
    """Move a device's state to the bundle ``bundle_dir``; returns (and writes) the decision.

    Args:
        state_dir: the device's adaptation folder (``head.npz`` from ``adapt``; may be empty).
        data_path: the device's local labelled data, to re-adapt when the backbone changed.
        adapt_kw: options of :func:`edgerun.adapt.adapt` for a re-adaptation.

    Returns:
        ``{"action": "kept" | "readapted" | "reset" | "fresh", ...}``; ``reset`` means the
        backbone changed and no data was given: the shipped head replaces the personal one.

    A bundle older than one this state folder accepted is refused unless ``allow_downgrade``
    (:mod:`edgerun.versions`: replay / downgrade protection).
    """
    from edgerun import adapt as ad
    from edgerun import versions
    from edgerun.commit import Commit, recover

    notes = recover(state_dir)  # a killed run's commit finished, orphan temps removed
    bundle = Bundle(bundle_dir, trust_key=trust_key)
    versions.check(bundle.manifest, state_dir, allow_downgrade=allow_downgrade)
    new = bundle_record(bundle)
    os.makedirs(state_dir, exist_ok=True)
    ckpt = os.path.join(state_dir, "head.npz")
    prev_path = os.path.join(state_dir, STATE_FILE)
    previous, warning = None, None
    if os.path.lexists(prev_path):
        from edgerun.files import open_regular

        try:  # only a record of the previous bundle: a damaged one is reported, not fatal
            with open_regular(prev_path, "bundle record", MAX_HEAD_BYTES) as f:
                previous = json.loads(f.read().decode("utf-8"))
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
        except (RunnerError, UnicodeDecodeError, ValueError, RecursionError) as e:
            previous = None
            warning = (f"{prev_path} is damaged ({e}); the previous bundle is unknown and the "
                       "record is rewritten")
    warnings = notes + ([warning] if warning else [])
    res = {"bundle": os.path.abspath(bundle_dir), "to": new, "from": previous,
           **({"warnings": warnings} if warnings else {})}
    c = Commit(state_dir)  # bundle.json, versions.json (and a reset head) as one step
    if not os.path.isfile(ckpt):
        res["action"] = "fresh"
        res["message"] = "no personal head yet: the device runs the bundle's head"
    else:
        old_bb = _head_meta(ckpt).get("backbone_sha256")
        same = old_bb == new["backbone_sha256"]
        if same:
            try:
                Head.load(ckpt, bundle)  # names and shapes of the new head graphs
            except RunnerError as e:
                same, why = False, str(e)
        else:
            why = (f"the backbone changed (sha256 {str(old_bb)[:12]}… -> "
                   f"{new['backbone_sha256'][:12]}…)")
        if same:
            res["action"] = "kept"
            res["message"] = ("same backbone: the personal head stays valid and is kept "
                              f"(bundle version {new['version']})")
        else:
            stale = os.path.join(state_dir, f"head.{str(old_bb)[:12]}.npz")
            copy_durable(ckpt, stale)
            # head.npz stays until the new head replaces it atomically: a crash (SIGKILL,
            # power cut) mid-re-adaptation leaves the old head, never none. adapt never keeps
            # a head of another backbone, even when it rolls back.
            res["stale_head"] = stale
            if data_path is not None:
                # one commit: the re-adapted head, its report and the bundle record
                rep = ad.adapt(bundle_dir, data_path, state_dir, trust_key=trust_key,
                               allow_downgrade=allow_downgrade, quiet=True,
                               commit_extra={STATE_FILE: new}, **adapt_kw)
                c = None
                res["action"] = "readapted"
                res["message"] = (f"{why}: re-adapted the new head on {data_path} (validation "
                                  f"{rep['accuracy_before']:.3f} -> {rep['accuracy_after']:.3f}"
                                  f"{', rolled back' if rep['rolled_back'] else ''})")
                res["adapt"] = {k: rep[k] for k in ("accuracy_before", "accuracy_after",
                                                    "rolled_back", "n_train", "n_val")}
            else:
                shipped = Head.from_bundle(bundle)
                c.stage("head.npz", lambda f: shipped.write(f, bundle, {"reset_from": stale}))
                res["action"] = "reset"
                res["message"] = (f"{why}: no local data given (--data), so the personal head "
                                  "was replaced by the bundle's shipped head; re-adapt with "
                                  "`run.py adapt` to personalise again")
    if c is not None:
        try:
            c.stage_json(STATE_FILE, new)
            record = versions.updated(bundle.manifest, state_dir,
                                      allow_downgrade=allow_downgrade)
            if record is not None:
                c.stage_json(versions.VERSIONS_FILE, record)
        except BaseException:
            c.abort()
            raise
        c.apply()
    if not quiet:
        import sys

        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{res['action']}: {res['message']}", file=sys.stderr)
    return res
