"""Training metrics: TensorBoard scalars + a progress bar with ETA, both on rank 0 only.

Scalars (one point per logged optimizer step, x axis = step; losses and gap stats are means
over the window's micro-batches, the rest are its last step's):
    train/loss, train/lm_loss, train/kl, train/grad_norm (before clipping),
    train/lr/<group> for each parameter group and train/lr (the language model's): the lr the
    step was taken with,
    divico/mu_over_vs, divico/sigma (the gap encoder's mean ||mu|| / ||v_s|| and sigma over
    kept tokens; modes with a gap encoder),
    perf/tokens_per_s, perf/samples_per_s, perf/visual_tokens_kept, memory/peak_gib,
    and with a Mixture-of-Experts encoder (pipeline/train/main.py's SumsLayout):
    moe/tau (the rate the step drew), train/aux/<name> and train/aux_weight/<name> (each
    auxiliary loss and its annealed weight), moe/router_weight/bucket_<tau>/expert_<tau> (the
    mean router weight of each expert over kept tokens whose rate is nearest that bucket's centre)
plus the resolved config as text and, at the end, hparams with the final losses; and with
train.overlay_every_steps, images divico/overlay/<i>: the visual tokens kept for fixed samples.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def peak_memory_gib() -> float:
    """Peak accelerator memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def flatten(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Metrics:
    def __init__(self, log_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int,
                 config: dict, config_yaml: str, description: str) -> None:
        self.enabled = enabled
        self.config = config
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a resume, points a crashed run logged past its checkpoint are dropped.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None)
        self.writer.add_text("config", f"```yaml\n{config_yaml}\n```", start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                             tok_s=f"{scalars['perf/tokens_per_s']:.0f}", refresh=False)

    def images(self, step: int, images: dict[str, Image.Image]) -> None:
        if self.enabled:
            for tag, image in images.items():
                self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def close(self, final: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if final:
            hparams = {k: v for k, v in flatten(self.config).items() if v is not None}
            self.writer.add_hparams(hparams, {f"final/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()
        self.bar.close()
