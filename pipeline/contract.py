"""What the stages, the launchers and the user agree on: file names, format versions, exit
codes, run names and the paper's constants. Each is stated here once.

Torch-free on purpose: data prep and the SLURM launcher read these without importing the
training stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# ---------------------------------------------------------------- exit codes (every `divico` command)
EXIT_OK = 0
EXIT_FAILURE = 1  # the work failed (a corrupt file, a non-finite loss, a failed verification)
EXIT_BAD_INPUT = 2  # bad arguments or config: the message names the input; nothing was started
EXIT_PREEMPTED = 3  # SIGUSR1/SIGTERM: a complete checkpoint was written; requeue and resume

# ---------------------------------------------------------------- data (LLaVA-665K and the shards)
DATA_FILE = "llava_v1_5_mix665k.json"
IMAGE_TOKEN = "<image>"  # the marker in a conversation; expanded to the visual tokens by the collator
IGNORE_INDEX = -100  # label of a position that no loss is taken on (transformers' convention)
# the shard folder's files, names and manifest: pipeline/data/shard_format.py

# ---------------------------------------------------------------- training outputs
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"  # in each checkpoint: step, samples consumed
TRAINABLES_FILE = "trainables.safetensors"  # in each checkpoint: trained weights other than LoRA
CHECKSUMS_FILE = "checksums.json"  # in each checkpoint, written last: size + sha256 of every other file
TRAIN_SUMMARY_FILE = "train_summary.json"  # written after an epoch's last step: the stage is done

# ---------------------------------------------------------------- the DiViCo module's files
# Format 2 records the gap encoder's kind and settings (config.encoder, config.moe) and
# config.kl_per_token; a format-1 file lacks them and loads with their defaults (the released
# single encoder, the KL summed over kept tokens), which is what format 1 always meant.
DIVICO_FORMAT_VERSION = 2
DIVICO_FORMATS_READ = (1, 2)
DIVICO_SETTINGS_FILE = "divico.json"
DIVICO_WEIGHTS_FILE = "divico.safetensors"

# ---------------------------------------------------------------- the paper
TAUS = (1 / 15, 1 / 9, 1 / 6)  # kept fraction: large / medium / small compression (38/64/96 of 576)


def tau_label(tau: float) -> str:
    """`tau111` for tau = 1/9: the kept fraction in tenths of a percent, three digits."""
    return f"tau{round(tau * 1000):03d}"


def nearest_tau(tau: float, taus: Sequence[float]) -> float:
    """The rate of `taus` nearest `tau` in log tau: the specialist a Mixture-of-Experts model is
    compared with at a rate no specialist was trained for."""
    return min(taus, key=lambda other: abs(math.log(other) - math.log(tau)))


def run_name(stage: str, tau: float | None = None) -> str:
    """The name of one training run (its TensorBoard run, its stage in `divico run`):
    `divico-tau111`, or the stage alone when it has no tau."""
    return stage if tau is None else f"{stage}-{tau_label(tau)}"
