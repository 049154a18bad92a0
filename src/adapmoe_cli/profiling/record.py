"""Records the routing an engine sees, as an observer of its MoE blocks: per forward pass (a prompt pass
or one decode step), each layer's experts and weights (before the adaptive gate), and what the next
layer's router predicts from the hidden state entering this layer's block — what the block prefetches
from. `trace()` turns the recording into a `Trace` plus the forward each row belongs to, so the very run
it was recorded from can be replayed (`simulate`, `bench --simulate`). Arrays only; no timing."""

from __future__ import annotations

import torch

from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.moe_block import LayerRecord, predict


class NextLayerPredictor:
    """Router l+1 applied to the hidden state entering layer l's experts: (next layer, ids, shares),
    descending."""

    def __init__(self, engine: Engine):
        fam = engine.store.family
        self.layers = list(engine.store.shape.moe_layers)
        self.routers = {layer: fam.router(engine.model, layer) for layer in self.layers}
        self.ordered = fam.ordered

    def __call__(self, rec: LayerRecord) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        i = self.layers.index(rec.layer)
        if i + 1 == len(self.layers):
            return None
        nxt = self.layers[i + 1]
        with torch.no_grad():
            w, ids = predict(self.routers[nxt], rec.hidden.detach(), self.ordered)
        return nxt, ids, w


class RoutingRecorder:
    """Append to `engine.observers.callbacks`; a forward pass starts whenever the first MoE layer is called."""

    def __init__(self, engine: Engine):
        self.predict = NextLayerPredictor(engine)
        self.layers = self.predict.layers
        self.k = engine.store.shape.top_k
        self.forwards: list[dict[int, list[torch.Tensor]]] = []  # per forward: layer → [ids, weights, pids, pw]

    def __call__(self, rec: LayerRecord) -> None:
        if rec.layer == self.layers[0]:
            self.forwards.append({})
        cur = self.forwards[-1]
        T = rec.ids.shape[0]
        row = cur.setdefault(rec.layer, [None, None, torch.full((T, self.k), -1, dtype=torch.int16),
                                         torch.zeros(T, self.k)])
        row[0], row[1] = rec.ids.to(torch.int16), rec.weights.detach().float()
        pred = self.predict(rec)
        if pred is not None:
            nxt, ids, w = pred
            cur.setdefault(nxt, [None, None, None, None])
            cur[nxt][2], cur[nxt][3] = ids.to(torch.int16), w.float()

    def trace(self) -> tuple[Trace, list[int]]:
        """The recorded rows (forward by forward) and the forward index of each row."""
        L, k = len(self.layers), self.k
        rows = sum(f[self.layers[0]][0].shape[0] for f in self.forwards)
        tr = Trace(torch.full((rows, L, k), -1, dtype=torch.int16), torch.zeros(rows, L, k),
                   torch.full((rows, L, k), -1, dtype=torch.int16), torch.zeros(rows, L, k),
                   torch.zeros(rows, dtype=torch.int32), list(self.layers))
        steps: list[int] = []
        r = 0
        for s, fwd in enumerate(self.forwards):
            T = fwd[self.layers[0]][0].shape[0]
            for i, layer in enumerate(self.layers):
                ids, w, pids, pw = fwd[layer]
                tr.ids[r:r + T, i], tr.weights[r:r + T, i] = ids, w
                if i > 0:
                    tr.pred_ids[r:r + T, i], tr.pred_weights[r:r + T, i] = pids, pw
            steps += [s] * T
            r += T
        return tr, steps
