"""Every error the pipeline raises for users. The CLI prints str(error) on one line and exits non-zero."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a problem the user can act on, described in one line."""

    exit_code = 2


class ManifestError(PipelineError, ValueError):
    """The manifest is unreadable, has an unknown or missing key, a wrong type or an impossible value."""


class IntegrityError(PipelineError):
    """An input file is truncated, inconsistent with its index, has bad names or non-finite weights."""


class FormatError(PipelineError):
    """An artifact file is not in a format this version can read (e.g. an unknown format_version)."""


class StageError(PipelineError):
    """A stage could not complete (its message names the stage and shard)."""


class VerifyError(StageError):
    """A quantized tensor is further from its source than verify.min_cos_sim allows."""


class LockedError(PipelineError):
    """Another live process holds the lock on this unit of work."""

    exit_code = 3


class HubError(PipelineError):
    """The Hub refused a request: missing repo or revision, gated repo, bad token, or a hash mismatch."""


class SlurmError(PipelineError):
    """sbatch/squeue/scontrol failed or are missing."""


class RuntimeBackendError(PipelineError):
    """A runtime backend cannot run here: no GPU, no nvcc to build the kernels, or an unsupported layout."""


class InputError(PipelineError, ValueError):
    """A chat input the engine refuses: an unreadable or oversized image, an empty prompt, a bad setting."""
