"""Projection (arithmetic, not a measurement): attribution's extra memory per rank for a 1B and a 7B Llama
under FSDP2 on 8 and 64 GPUs, cached vs streaming, from the sizes of what each schedule keeps.

- cached: every attributed module's input and output gradient of every micro-batch of the step (bf16),
  plus the owned part of W and the full W of the largest module while its products run (fp32);
- streaming, exact products: the full W of every attributed parameter, replicated (fp32), plus one
  module's products in flight (negligible);
- streaming, stream_predictor='momentum' with product_rank=16: rank-16 factors of each matrix layer,
  embeddings and norms dense;
- streaming, stream_predictor='subspace' (the default), sketch_rank=16, 8 micro-batches: the bases of
  every matrix (U and V, K * 16 columns each, fp32, replicated), each sample's sketches ([32, 32] per
  matrix) and norm gradients ([d] per norm), and after the backward what cached has then (the owned W
  and the largest module's full W).
K = 2 targets; micro-batches of 8 x 2048 tokens per rank. The training's own memory is not included.

    python benchmarks/memory_projection.py
"""
from dataclasses import dataclass

GIB = 2 ** 30


@dataclass
class Llama:
    name: str
    d: int
    layers: int
    ffn: int
    kv: int        # key/value width (grouped-query attention)
    vocab: int
    tied: bool

    def linears(self):
        """(d_in, d_out) of every Linear of one decoder layer."""
        d = self.d
        return [(d, d), (d, self.kv), (d, self.kv), (d, d), (d, self.ffn), (d, self.ffn), (self.ffn, d)]

    def params(self) -> int:
        matrices = self.layers * sum(i * o for i, o in self.linears())
        norms = (2 * self.layers + 1) * self.d
        embeddings = self.vocab * self.d * (1 if self.tied else 2)
        return matrices + norms + embeddings


MODELS = [Llama("Llama 1B (3.2-1B shapes)", 2048, 16, 8192, 512, 128256, True),
          Llama("Llama 7B (2-7B shapes)", 4096, 32, 11008, 4096, 32000, False)]
K, TOKENS, RANK = 2, 8 * 2048, 16


def cached_captures(m: Llama) -> float:
    """Bytes kept per micro-batch: input and output gradient (bf16) of every Linear and of the LM head; norm
    layers keep [b, d] sums only, the embedding its output gradient."""
    per_token = m.layers * sum(i + o for i, o in m.linears()) + (m.d + m.vocab) + m.d
    return 2.0 * TOKENS * per_token


def streaming_lowrank_w(m: Llama) -> float:
    factors = m.layers * sum(RANK * (i + o) for i, o in m.linears()) + RANK * (m.d + m.vocab)  # + LM head
    dense = (2 * m.layers + 1) * m.d + m.vocab * m.d  # norms, and the input embedding's W
    return 4.0 * K * (factors + dense)


def matrices(m: Llama) -> list[tuple[int, int]]:
    """(d_in, d_out) of every matrix weight: the Linears, the embedding and (untied) the LM head."""
    return m.layers * m.linears() + [(m.vocab, m.d)] * (1 if m.tied else 2)


def streaming_subspace(m: Llama, w_after: float, micro: int = 8) -> float:
    width = K * RANK
    bases = 4.0 * sum(width * (i + o) for i, o in matrices(m))
    per_sample = len(matrices(m)) * width * width + (2 * m.layers + 1) * m.d
    return bases + 4.0 * 8 * micro * per_sample + w_after


def main():
    print("| model | GPUs | cached, 1 micro-batch | cached, 8 micro-batches | streaming exact W | streaming rank-16 W "
          "| streaming subspace, 8 micro-batches |")
    print("|---|---|---|---|---|---|---|")
    for m in MODELS:
        n = m.params()
        largest = max(max(i * o for i, o in m.linears()), m.vocab * m.d)
        for gpus in (8, 64):
            w_cached = 4.0 * K * (n / gpus + largest)
            cells = [w_cached + cached_captures(m), w_cached + 8 * cached_captures(m), 4.0 * K * n,
                     streaming_lowrank_w(m), streaming_subspace(m, w_cached)]
            print(f"| {m.name}, {n / 1e9:.2f}B | {gpus} | " + " | ".join(f"{c / GIB:.1f} GiB" for c in cells) + " |")


if __name__ == "__main__":
    main()
