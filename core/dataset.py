"""Generated data: a spec's `dataset` section asks a dataset plugin to write a study's files.

The files go to the cache, in a folder named by a hash of the plugin, its version, its
options and the study seed, and the spec's relative paths (cases, images, training sets)
are then resolved against that folder. A folder is written under a temporary name and
renamed when complete, so an interrupted generation is redone and a finished one reused.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import attrs

from .errors import PerceptcoreError
from .plugins import Registry
from .runner import plugin_version, stable_hash
from .spec import Spec, structure


def generated(spec: Spec, registry: Registry) -> bool:
    """Whether the spec's data exist: it generates none, or they are in the cache (checks the section)."""
    return spec.dataset is None or _folder(spec, registry)[0].is_dir()


def _folder(spec: Spec, registry: Registry) -> tuple:
    """The cache folder of the spec's generated data, its generator and checked options."""
    section = spec.dataset
    generator = registry.get("dataset", section.name, "dataset.name")
    options = structure(generator.Options, section.options, "dataset.options")
    key = stable_hash([generator.name, plugin_version(registry, "dataset", generator.name),
                       attrs.asdict(options, recurse=True), spec.study.seed])
    return Path(spec.base) / spec.runner.cache / "datasets" / f"{generator.name}-{key}", generator, options


def with_generated_data(spec: Spec, registry: Registry, progress: Callable[[str], None]) -> Spec:
    """The spec with data_dir pointing at its generated data (generated now if not cached)."""
    if spec.dataset is None:
        return spec
    folder, generator, options = _folder(spec, registry)
    if folder.is_dir():
        progress(f"dataset {generator.name}: using {folder}")
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # mkdir, not mkdtemp: the dataset gets the user's umask (mkdtemp's is owner-only).
        staging = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}"
        staging.mkdir()
        progress(f"dataset {generator.name}: generating into {folder}")
        try:
            generator.generate(options, staging, spec.study.seed, progress)
            try:
                staging.rename(folder)
            except OSError:
                if not folder.is_dir():
                    raise
                # Another run (a parallel sweep) generated the same data first: the key says they are equal.
        except PerceptcoreError:
            raise
        except Exception as exc:
            raise PerceptcoreError(f"dataset {generator.name!r} failed: {type(exc).__name__}: {exc}",
                                   "dataset") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return attrs.evolve(spec, data_dir=str(folder.resolve()))
