"""Recoverable Compression (Chen et al., AAAI 2025, "A Multimodal Vision Token Recovery Mechanism
Guided by Text Information"; banjiuyufen/Recoverable-Compression, llava/model/multimodal_encoder/
clip_encoder.py): training-free, before the decoder. For each image of N patches:

1. visual filter: [CLS]'s attention over the patches, as PruMerge reads it (the q/k of the vision
   layer after the feature layer, one head over the whole width); the dynamic scale filter
   (below) flags n_v of these scores, and the top n_v patches are kept;
2. text recovery: every patch's similarity with the question (cosine / sqrt(768)), those of
   step 1 set to the minimum; the filter flags c_t of them, and the top floor((N - n_v) c_t / N)
   patches not kept yet are kept too;
3. secondary recovery: the filter flags n_c of the M patches left by their [CLS] attention, and
   the top n_c by attention become cluster centres. Each centre absorbs the 32 other patches
   left that are nearest it by key cosine + 50 x text score: centre + sum(attention x features)
   over them (unnormalised: the official `/ torch.sum(weights)` is commented out). One more
   token is the attention-weighted sum of the patches left that are not centres.
The dynamic scale filter is scikit-learn's LocalOutlierFactor on the 1-D scores (20 neighbours
in steps 1 and 2, 10 in step 3, contamination "auto"): the count of outliers it flags, high or
low, is the count kept (the official `find_max_derivative_position`).

`recoverable` runs as published: each image keeps what the filter says, whatever tau (about 10%
of 576 in the paper). `recoverable_budget` keeps exactly k = round(tau N), to compare with the
other modes at equal tokens: the same steps in the same order, each capped by what the budget
has left (n_v' = min(n_v, k), n_t' = min(n_t, k - n_v')); the k - n_v' - n_t' tokens left are
step 3's, as that many centres less one plus the extra token.

The text embedding. The official code encodes the question with CLIP's text tower and the
patches with a second pass of CLIP's vision tower through visual_projection; llava-hf checkpoints
hold neither. Here the question is the mean of the language model's input embeddings over its
tokens (the text between the image and the answer: CompressedLlava's question_vectors) and each
patch is its projector output: the projector is trained to map patches into that space, so it
is the one image-text space the checkpoint itself has, and no second checkpoint or tokenizer is
needed. The official scale (1 / sqrt(768)) and weight (50) are kept, so the key cosine and the
text score weigh in step 3 as they do there.

Departures from the official code:
- The text is the question, as the paper says. The code decodes the prompt and takes its first
  line, under vicuna_v1 the system prompt: an apparent bug.
- Step 3's count: the code's int(N r) takes N from `index.shape[-1]`, the feature width (1024),
  not the number of patches left; here it is the M patches left (the paper: cluster the rest).
- Step 3's keys: the code gathers from the keys of all N patches with indices into the patches
  left, so a centre is compared with other patches' keys; here each patch has its own key.
- Step 2 picks only patches step 1 did not keep (the code's minimum can still pick them on ties).
- Places: kept patches stay in their places with their original position ids, each centre at its
  own patch and the extra token at the place of the non-centre patch [CLS] attends to most (the
  code appends the centres and the extra token after the kept patches, renumbered).
- Any batch size (the official loader asserts batch 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor

from pipeline.model.divico import kept_count
from pipeline.model.modes import CompressionMode
from pipeline.model.vision import ImageTokens

FILTER_NEIGHBOURS = 20  # steps 1 and 2
CLUSTER_FILTER_NEIGHBOURS = 10  # step 3 (scikit-learn's default, which the code leaves)
CLUSTER_SIZE = 32  # the patches each centre absorbs
TEXT_SCALE = 768 ** -0.5  # the official text score: cosine / sqrt(CLIP's projection width)
TEXT_WEIGHT = 50.0  # the text score's weight beside the key cosine in step 3


def outlier_count(scores: torch.Tensor, neighbours: int) -> int:
    """The dynamic scale filter: how many of the 1-D `scores` LocalOutlierFactor flags."""
    if len(scores) < 2:
        return 0
    factor = LocalOutlierFactor(n_neighbors=min(neighbours, len(scores) - 1), contamination="auto")
    return int((factor.fit_predict(scores.detach().float().cpu().numpy()[:, None]) == -1).sum())


def top(scores: torch.Tensor, among: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` indices of `among` with the highest `scores` (ties: the earlier index)."""
    order = scores[among].argsort(descending=True, stable=True)
    return among[order[:count]]


def absorb(centres: torch.Tensor, rest: torch.Tensor, attention: torch.Tensor, text: torch.Tensor,
           keys: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Step 3's merge: (n_c, d), each centre's features plus the [CLS]-attention-weighted sum of
    the CLUSTER_SIZE other patches of `rest` nearest it by key cosine + TEXT_WEIGHT x text score."""
    normed = F.normalize(keys.float(), dim=-1)
    closeness = normed[centres] @ normed[rest].T + TEXT_WEIGHT * text[rest][None]  # (n_c, M)
    closeness[rest[None] == centres[:, None]] = float("-inf")  # a centre does not absorb itself
    members = rest[closeness.topk(min(CLUSTER_SIZE, len(rest) - 1), dim=1).indices]  # (n_c, 32)
    absorbed = (attention[members, None] * features[members].float()).sum(1)
    return (features[centres].float() + absorbed).to(features.dtype)


def recover(attention: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
            budget: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's steps 1-3: (keep (N,) bool, features (N, d) with the merged tokens in place).
    attention (N,): [CLS]'s; text (N,): the text scores; keys (N, d_k); budget: k, or None as published."""
    num_patches = len(attention)
    every = torch.arange(num_patches, device=attention.device)
    num_visual = outlier_count(attention, FILTER_NEIGHBOURS)
    if budget is not None:
        num_visual = min(num_visual, budget)
    visual = top(attention, every, num_visual)
    free = torch.ones(num_patches, dtype=torch.bool, device=attention.device)
    free[visual] = False
    filtered = text.clone()
    filtered[visual] = text.min()
    num_text = (num_patches - num_visual) * outlier_count(filtered, FILTER_NEIGHBOURS) // num_patches
    if budget is not None:
        num_text = min(num_text, budget - num_visual)
    free[top(text, free.nonzero().flatten(), num_text)] = False
    keep = ~free
    merged = features.clone()
    rest = free.nonzero().flatten()
    if budget is None:
        num_centres = outlier_count(attention[rest], CLUSTER_FILTER_NEIGHBOURS)
        with_extra = len(rest) > num_centres
    else:  # what the budget has left: that many centres less one, and the extra token
        left = budget - int(keep.sum())
        num_centres, with_extra = max(left - 1, 0), left > 0
    if not len(rest) or not (num_centres or with_extra):
        return keep, merged
    centres = top(attention, rest, num_centres)
    if num_centres and len(rest) > 1:
        merged[centres] = absorb(centres, rest, attention, text, keys, features)
    keep[centres] = True
    if with_extra:
        others = rest[~torch.isin(rest, centres)]
        slot = top(attention, others, 1)
        merged[slot] = (attention[others, None] * features[others].float()).sum(0).to(features.dtype)
        keep[slot] = True
    return keep, merged


def text_scores(tokens: ImageTokens) -> torch.Tensor:
    """(n, N): each patch's projector output against its image's question, cosine x TEXT_SCALE."""
    patches = F.normalize(tokens.projected.float(), dim=-1)
    question = F.normalize(tokens.question.float(), dim=-1)
    return (patches @ question[:, :, None])[..., 0] * TEXT_SCALE


class RecoverableCompression(CompressionMode):
    """recoverable: as published, a count of its own per image."""

    before_decoder = True
    attention_after_features = True
    reads_question = True
    reads_attention = False
    trainable = False
    at_budget = False

    def kept_tokens(self, num_visual: int, tau: float, counts: str = "project") -> int | None:
        return super().kept_tokens(num_visual, tau, counts) if self.at_budget else None

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention, text = tokens.cls_attention(heads=1), text_scores(tokens)
        n, num_patches = attention.shape
        keep, features = [], []
        for image in range(n):  # each image at its own rate and count
            budget = kept_count(num_patches, float(keep_ratio[image])) if self.at_budget else None
            kept, merged = recover(attention[image], text[image], tokens.keys[image, 1:], tokens.features[image],
                                   budget)
            keep.append(kept)
            features.append(merged)
        return torch.stack(keep), torch.stack(features)


class RecoverableCompressionAtBudget(RecoverableCompression):
    """recoverable_budget: the same steps, round(tau N) tokens per image."""

    at_budget = True
