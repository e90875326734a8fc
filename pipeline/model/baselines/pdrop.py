"""PyramidDrop (Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"; Cooperx521/PyramidDrop): the visual tokens are dropped in
stages inside the language model, each stage keeping a share lambda of what the one before kept:
lambda N after layer K, lambda^2 N from layer L/4, lambda^3 N from layer L/2 (of L layers; the
stages after K are the ones that fall after it and before the last layer). At each stage the
tokens left are ranked by the attention the last instruction token pays them, averaged over
heads. Here lambda is divico.tau; on LLaVA-1.5-7B (32 layers, K = 2) the stages are at layers
2, 8 and 16, the schedule the authors give for a 64-token average with lambda = 0.19 (109, 20
and 3 of 576 tokens, issue #29 of their repository; 109, 21 and 4 here, where counts round
instead of truncating). Training-free and usable in training (the
authors fine-tune with the same schedule): a trained mode as select_only is.

Departures from the official code:
- A stage's ranking reads the attention of the layer before it, from that layer's own q/k
  projections captured while it runs (as FastV and DiViCo here), instead of running the next
  layer's input norm and q/k projections over the sequence a second time;
- kept tokens keep their original position ids (the official code renumbers them);
- the query is the token before the first answer (this project's rule; the last instruction
  token at inference, as in the official code).
"""

from __future__ import annotations

from pipeline.model.modes import CompressionMode

# The later stages' layers as shares of the depth: L/4 and L/2, after the first at K.
STAGE_DEPTHS = (1 / 4, 1 / 2)


class PyramidDrop(CompressionMode):
    def later_stages(self, num_layers: int, layer: int, tau: float) -> list[tuple[int, float]]:
        stages, rate = [], tau
        for depth in STAGE_DEPTHS:
            stage = round(num_layers * depth)
            if layer < stage < num_layers and (not stages or stage > stages[-1][0]):
                rate *= tau
                stages.append((stage, rate))
        return stages
