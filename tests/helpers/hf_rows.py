"""Token rows with learnable structure for the Hugging Face Trainer tests: a Dataset whose rows carry their
`sample_id`, and one held-out target batch."""
import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "sample_id": i}


def rows_and_target(n: int, T: int, vocab: int, held_out: int = 4):
    """(Rows of n sequences of T tokens, {"val": a target batch of `held_out` sequences})."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n + held_out, T), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % vocab  # learnable structure
    return Rows(ids[:n]), {"val": {"input_ids": ids[n:], "labels": ids[n:]}}
