"""Checkpoints: ours (atomic save, weights_only load) and the reference repo's released ``.pth.tar``.

Our format is a dict ``{"format": "tokenlabel", "version": 1, "model_name", "model_args",
"state_dict", **extra}`` so ``load_checkpoint(path)`` can rebuild the model by itself. The
reference's files are a plain state dict, or a dict holding it under ``state_dict`` /
``state_dict_ema`` / ``model``; its key names are the ones our LV-ViT uses, with an optional
``module.`` prefix from DDP.
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "tokenlabel"


def unwrap_model(model):
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model, **extra) -> Path:
    """Write ``model``'s weights plus ``extra`` (optimizer state, epoch, ...) to ``path`` atomically.

    The file is written next to ``path`` under a temporary name, flushed to disk, then renamed over
    ``path``: an interrupted save never leaves a partial file where a good checkpoint was.
    """
    path = Path(path)
    model = unwrap_model(model)
    reserved = {"format", "version", "model_name", "model_args", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} are reserved by the checkpoint format")
    payload = {"format": FORMAT, "version": 1, "model_name": getattr(model, "model_name", None),
               "model_args": getattr(model, "model_args", None), "state_dict": model.state_dict(), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path, map_location):
    # timm-style training checkpoints (the reference's) also pickle the argparse Namespace of the
    # run: allow exactly that class besides weights_only's tensors and containers.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _reference_state_dict(raw, use_ema: bool, path):
    """The state dict inside a reference-repo checkpoint (plain, or under a known key)."""
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    keys = ("state_dict_ema", "state_dict", "model") if use_ema else ("state_dict", "model", "state_dict_ema")
    for key in keys:
        if isinstance(raw.get(key), dict):
            sd = raw[key]
            break
    else:
        if all(isinstance(v, torch.Tensor) for v in raw.values()):
            sd = raw
        else:
            raise ValueError(f"checkpoint {path} has no state dict: top-level keys {sorted(raw)[:20]}, expected a "
                             f"plain state dict or one of 'state_dict', 'state_dict_ema', 'model'")
    if use_ema and "state_dict_ema" not in raw:
        raise ValueError(f"use_ema=True but checkpoint {path} has no 'state_dict_ema' (keys: {sorted(raw)[:20]})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def resize_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a position embedding ``[1, prefix + h*w, D]`` to ``new_grid`` (int or (h, w)).

    The grid part is interpolated bicubically (align_corners=False, in float32); the cls position
    (the first ``num_prefix_tokens`` rows) is kept as it is.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, prefix + h*w, D], got {tuple(pos_embed.shape)}")
    new_hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"pos_embed has {n} grid positions, not a square; pass old_grid=(h, w)")
        old_hw = (side, side)
    else:
        old_hw = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
    if old_hw[0] * old_hw[1] != n:
        raise ValueError(f"old_grid={old_hw} does not match the {n} grid positions of pos_embed")
    if old_hw == new_hw:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_hw, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], D).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


_resize_pos_embed = resize_pos_embed  # the loaders' keyword argument shadows the name


def load_state_dict_into(model, state_dict: dict, strict: bool = True, resize_pos_embed: bool = False,
                         source: str = "state dict") -> dict:
    """Load ``state_dict`` into ``model`` with clear reports; returns {"missing_keys", "unexpected_keys"}.

    Missing or unexpected keys raise (``strict``) or are listed in a warning (not strict); shape
    mismatches always raise. A position embedding of another grid is resized when
    ``resize_pos_embed``, else it is an error naming both image sizes.
    """
    model = unwrap_model(model)
    own = model.state_dict()
    sd = dict(state_dict)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        src, dst = sd["pos_embed"], own["pos_embed"]
        n_src, n_dst = src.shape[1] - 1, dst.shape[1] - 1
        side_src, side_dst = int(round(n_src ** 0.5)), int(round(n_dst ** 0.5))
        patch = getattr(model, "patch_size", 16)
        if src.shape[-1] != dst.shape[-1] or side_src ** 2 != n_src:
            raise ValueError(f"{source}: pos_embed {tuple(src.shape)} cannot fit the model's {tuple(dst.shape)}")
        if not resize_pos_embed:
            raise ValueError(
                f"{source} was made for {side_src * patch}x{side_src * patch} images ({side_src}x{side_src} tokens) "
                f"but the model is built for {side_dst * patch}x{side_dst * patch} ({side_dst}x{side_dst} tokens); "
                f"pass resize_pos_embed=True to resize the position embedding (bicubic), or build the model at "
                f"img_size={side_src * patch}")
        sd["pos_embed"] = _resize_pos_embed(src, side_dst)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{source}: shape mismatch for {len(mismatched)} key(s): " + "; ".join(mismatched[:10]))
    if missing or unexpected:
        msg = (f"{source}: {len(missing)} missing key(s) {missing[:20]}"
               f"{' ...' if len(missing) > 20 else ''}, {len(unexpected)} unexpected key(s) {unexpected[:20]}"
               f"{' ...' if len(unexpected) > 20 else ''}")
        if strict:
            raise ValueError(msg + " (pass strict=False to load the rest)")
        warnings.warn(msg, stacklevel=3)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing_keys": missing, "unexpected_keys": unexpected}


def load_reference_checkpoint(model, path: str | os.PathLike, strict: bool = True, use_ema: bool = False,
                              resize_pos_embed: bool = False) -> dict:
    """Load a reference-repo checkpoint (e.g. ``lvvit_s-26M-224-83.3.pth.tar``) into ``model``.

    Takes ``state_dict`` (or ``model``; ``state_dict_ema`` with ``use_ema=True``), strips a
    ``module.`` prefix, reports missing/unexpected keys. Returns {"missing_keys", "unexpected_keys"}.
    """
    raw = _read(path, "cpu")
    sd = _reference_state_dict(raw, use_ema, path)
    return load_state_dict_into(model, sd, strict, resize_pos_embed, source=f"checkpoint {path}")


def load_checkpoint(path: str | os.PathLike, model=None, strict: bool = True, resize_pos_embed: bool = False,
                    map_location="cpu", use_ema: bool = False) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (or a reference-repo one) into ``model``.

    With ``model=None`` the model is rebuilt from the stored name and arguments (our format only).
    Returns the checkpoint dict (``state_dict`` and every ``extra`` given to ``save_checkpoint``)
    with ``"model"`` set to the loaded module and ``"missing_keys"`` / ``"unexpected_keys"``.
    """
    raw = _read(path, map_location)
    ours = isinstance(raw, dict) and raw.get("format") == FORMAT
    if model is None:
        if not ours or not raw.get("model_name"):
            raise ValueError(f"checkpoint {path} does not say which model it holds; build the model and pass it "
                             f"(load_checkpoint(path, model) or load_reference_checkpoint(model, path))")
        from .attention import cannot_run_here  # noqa: PLC0415
        from .registry import create_model  # noqa: PLC0415

        args = dict(raw.get("model_args") or {})
        # The attention backend is how the weights were run, not part of the model: one that cannot run here
        # becomes "auto" (a GPU checkpoint evaluated or used as a teacher on a CPU machine, say).
        reason = cannot_run_here(args["attn"]) if args.get("attn") else None
        if reason:
            warnings.warn(f"checkpoint {path} was trained with attn={args['attn']!r}, which {reason}; rebuilding "
                          f"it with attn='auto'", stacklevel=2)
            args["attn"] = "auto"
        model = create_model(raw["model_name"], **args)
    if ours:
        sd = raw["state_dict"]
        if use_ema:
            if not isinstance(raw.get("state_dict_ema"), dict):
                raise ValueError(f"use_ema=True but checkpoint {path} has no 'state_dict_ema'")
            sd = raw["state_dict_ema"]
        report = load_state_dict_into(model, sd, strict, resize_pos_embed, source=f"checkpoint {path}")
        out = dict(raw)
    else:
        report = load_state_dict_into(model, _reference_state_dict(raw, use_ema, path), strict, resize_pos_embed,
                                      source=f"checkpoint {path}")
        out = dict(raw) if isinstance(raw, dict) else {}
    out.update(report, model=model)
    return out
