"""The Mixture-of-Experts gap encoder: one DiViCo model for every compression rate.

The paper (section VI) trains one model per tau and proposes, without building it, gap
encoders for large, medium and small compression mixed by a router, the matching expert
leading. `MixtureGapEncoder` is that, in the gap-encoder slot of pipeline/model/divico.py
(`divico.encoder: moe`, settings in `divico.moe`):

- Experts: one g_theta of the released shape (`GapEncoder`) per centre rate c_e
  (default 1/15, 1/9, 1/6), each giving (mu_e, l_e) for every kept token.
- Router: softmax weights w_e over the experts, per sample, from the rate features
  f_e = -((log tau - log c_e) / s)^2 (s half the span of the log centres) and, with
  `router_reads_tokens`, LayerNorm(concat(v_p, mean of the kept tokens v_s)):
  logits = Linear(tanh(Linear(features))) + Linear(f). The rate's direct path starts as the
  identity and the MLP's last layer at zero, so routing starts where the paper puts it, the
  matching expert leading (weights 0.77 / 0.57 / 0.68 on the nearest expert at the
  three default centres), and the losses move it from there. Started uniform instead, a
  router learnt the prior only after hundreds of steps (Adam moves each weight by about the
  lr per step), longer than the demo's whole stage.
- Posterior: the Gaussian whose mean and variance are the router-weighted means of the
  experts', mu = sum_e w_e mu_e and sigma^2 = sum_e w_e sigma_e^2, i.e.
  l = log sum_e w_e exp(l_e) (a log-sum-exp). It is not the moment-matched mixture, whose
  variance would add the experts' disagreement sum_e w_e (mu_e - mu)^2 as sampling noise and
  so pull the experts together. With one expert at weight 1 it is exactly that expert.
- KL: that Gaussian's closed form against the prior, the same `kl_divergence` as DiViCo's
  (normalised per kept token in the MoE recipe, `kl_per_token`). Training samples
  mu + eps * sigma (reparameterised), evaluation uses mu, as DiViCo does.
- Routing prior (auxiliary loss "routing_prior", weight `moe.prior_weight`, annealed by the
  training recipe): the mean over kept tokens of -log w_e* for the expert e* whose centre is
  nearest tau in log tau. It keeps routing interpretable; without it the router may collapse
  onto one expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.model.divico import GapEncoder, GapEstimate
from pipeline.model.settings import DiViCoConfig


def nearest_expert(keep_ratio: torch.Tensor, log_centres: torch.Tensor) -> torch.Tensor:
    """(T,) index of the expert whose centre is nearest each rate in log tau: the routing
    prior's target, and the tau bucket the trainer logs router weights under."""
    return (keep_ratio.float().log()[:, None] - log_centres.to(keep_ratio.device)).abs().argmin(dim=1)


class MixtureGapEncoder(nn.Module):
    """Experts + router in the gap-encoder slot; see the module docstring for the maths."""

    param_group = "gap_encoder"  # experts and router train at optim.encoder_lr

    def __init__(self, hidden_size: int, config: DiViCoConfig) -> None:
        super().__init__()
        settings = config.moe
        settings.validate()
        log_centres = torch.tensor([math.log(c) for c in settings.centres], dtype=torch.float64)
        self.rate_scale = float(log_centres[-1] - log_centres[0]) / 2
        self.register_buffer("log_centres", log_centres.float(), persistent=False)  # divico.json records them
        self.experts = nn.ModuleList(GapEncoder(hidden_size, config) for _ in settings.centres)
        experts = len(settings.centres)
        self.reads_tokens = settings.router_reads_tokens
        self.summary_norm = nn.LayerNorm(2 * hidden_size) if self.reads_tokens else None
        inputs = experts + (2 * hidden_size if self.reads_tokens else 0)
        self.router = nn.Sequential(nn.Linear(inputs, settings.router_hidden), nn.Tanh(),
                                    nn.Linear(settings.router_hidden, experts))
        self.rate_logits = nn.Linear(experts, experts)  # the rate's direct path to the logits
        self.aux_weights = {"routing_prior": settings.prior_weight}
        nn.init.zeros_(self.router[-1].weight)
        nn.init.zeros_(self.router[-1].bias)
        with torch.no_grad():  # logits = f at the start: the nearest expert leads
            self.rate_logits.weight.copy_(torch.eye(experts))
            self.rate_logits.bias.zero_()

    def rate_features(self, keep_ratio: torch.Tensor) -> torch.Tensor:
        """(T,) rates -> (T, experts): -((log tau - log c_e) / s)^2 per expert, s half the span
        of the log centres (0 at an expert's centre, about -1 at its neighbour's)."""
        distance = (keep_ratio.float().log()[:, None] - self.log_centres) / self.rate_scale
        return -distance.square()

    def route(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: torch.Tensor,
              sample_index: torch.Tensor) -> torch.Tensor:
        """(T, experts) log router weights; every token of a sample gets its sample's."""
        rates = self.rate_features(keep_ratio).to(selected.dtype)
        features = rates
        if self.reads_tokens:
            num_samples = int(sample_index.max()) + 1
            counts = torch.zeros(num_samples, device=selected.device, dtype=selected.dtype)
            counts.index_add_(0, sample_index, torch.ones_like(sample_index, dtype=selected.dtype))
            kept_sum = torch.zeros(num_samples, selected.shape[-1], device=selected.device, dtype=selected.dtype)
            kept_mean = kept_sum.index_add(0, sample_index, selected) / counts[:, None]
            summary = self.summary_norm(torch.cat([pooled, kept_mean[sample_index]], dim=-1))
            features = torch.cat([features, summary], dim=-1)
        return (self.router(features) + self.rate_logits(rates)).log_softmax(dim=-1)

    def forward(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: torch.Tensor,
                sample_index: torch.Tensor) -> GapEstimate:
        log_weights = self.route(selected, pooled, keep_ratio, sample_index)
        estimates = [expert(selected, pooled, keep_ratio, sample_index) for expert in self.experts]
        mus = torch.stack([e.mu for e in estimates], dim=1)  # (T, experts, d)
        log_ratios = torch.stack([e.log_ratio for e in estimates], dim=1)
        weights = log_weights.exp()
        mu = (weights[..., None] * mus).sum(1)
        log_ratio = torch.logsumexp(log_weights[..., None] + log_ratios, dim=1)
        nearest = nearest_expert(keep_ratio, self.log_centres)
        prior = -log_weights.gather(1, nearest[:, None]).float().mean()
        return GapEstimate(mu, log_ratio, {"routing_prior": prior}, weights)
