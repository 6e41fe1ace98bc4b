"""Where prior files live: the `cache_priors` model folder, and beside the checkpoints they were fitted for.

The folder is registered when the nodes load. A `cache_priors` entry from extra_model_paths.yaml (loaded before custom
nodes) stays first, so priors are saved where the user asked; the default `models/cache_priors` is added after it and
created only when a file is saved there.
"""

from __future__ import annotations

import logging
import os

import folder_paths

FOLDER = "cache_priors"
EXTENSIONS = {".safetensors"}
SUFFIX = ".tcc.safetensors"
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")
NONE = "none"
log = logging.getLogger("calibrated_cache")


def register() -> None:
    """Add `cache_priors` to ComfyUI's model folders (listed by GET /models/cache_priors and the nodes' combos)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    folder_paths.add_model_folder_path(FOLDER, default, is_default=False)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    if not extensions:  # a yaml-defined name gets an empty set, which would list every file
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def prior_folder() -> str:
    """The folder new prior files go to: the first registered one (a yaml entry wins over the default)."""
    return folder_paths.get_folder_paths(FOLDER)[0]


def prior_files() -> list[str]:
    """Prior files by relative name: the cache_priors folders first, then those beside checkpoints."""
    names = [n for folder in (FOLDER, *CHECKPOINT_FOLDERS) for n in folder_paths.get_filename_list(folder)
             if n.endswith(SUFFIX)]
    return list(dict.fromkeys(names))


def checkpoints() -> list[str]:
    """Model files a prior can be named after and saved beside (prior files themselves excluded)."""
    names = [n for folder in CHECKPOINT_FOLDERS for n in folder_paths.get_filename_list(folder)
             if not n.endswith(SUFFIX)]
    return list(dict.fromkeys(names))


def find(name: str, folders: tuple[str, ...]) -> str | None:
    """The full path of a relative name in the first of `folders` that holds it."""
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    return None


def find_prior(name: str) -> str:
    """The path of a prior file the folders list: any other name (a path, `..`) is refused, so a name chosen in the
    graph editor or sent to the HTTP API cannot reach a file outside the prior folders."""
    path = find(name, (FOLDER, *CHECKPOINT_FOLDERS)) if name in prior_files() else None
    if path is None:
        raise ValueError(f"prior file {name} was not found in the cache_priors folders or beside the checkpoints; "
                         "refresh the node list (press r) and choose another file")
    return path


def prior_name(checkpoint: str, tag: str) -> str:
    """`<checkpoint name without extension>.<policy tag>.tcc.safetensors` ("model" when no checkpoint is named)."""
    stem = "model" if checkpoint == NONE else os.path.splitext(os.path.basename(checkpoint))[0]
    return f"{stem}.{tag}{SUFFIX}"


def target_path(checkpoint: str, tag: str, beside_checkpoint: bool) -> str:
    """Beside the checkpoint when asked and that folder is writable, else in the first cache_priors folder."""
    if checkpoint != NONE and checkpoint not in checkpoints():
        raise ValueError(f"checkpoint {checkpoint} is not in the checkpoints or diffusion_models folders; refresh the "
                         "node list (press r) and choose the model's file, or none")
    name = prior_name(checkpoint, tag)
    if beside_checkpoint and checkpoint != NONE:
        path = find(checkpoint, CHECKPOINT_FOLDERS)
        if path is not None and os.access(os.path.dirname(path), os.W_OK):
            return os.path.join(os.path.dirname(path), name)
        log.warning("calibrated_cache: cannot write beside %s; the priors go to the cache_priors folder", checkpoint)
    return os.path.join(prior_folder(), name)
