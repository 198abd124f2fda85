"""A quiet start: third-party import chatter that says nothing to our users, silenced unless `hlwq -v`.

torchao logs, on every import, that its kernels for other GPU architectures did not load ("Failed to load ..._C_mxfp8"),
that Triton is absent on a CPU host, and torch logs that torchao's enums no longer need pytree registration. None of
it changes what the command does.
"""

from __future__ import annotations

import logging
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_libraries() -> None:
    """Noisy loggers to ERROR, deprecation chatter from torch/torchao ignored; call before importing them."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|torchao)(\.|$)")
