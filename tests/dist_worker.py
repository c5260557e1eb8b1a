"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: train the tiny config and
write a fingerprint of this rank's trainable weights and skill bank to RUN/rank-N.json."""

import hashlib
import json
import sys
from pathlib import Path

import torch

import sgsd.verifier as verifier
from sgsd.config import load_config
from sgsd.configs import resolve_config_path
from sgsd.trainer import Trainer


class _Verdict:
    def __init__(self, ok):
        self.correct, self.reason, self.extracted = ok, None, None


# random tiny models never answer correctly: alternate verdicts so both outcome signs occur
verifier.grade_many = lambda pairs, **kw: [_Verdict(i % 2 == 0) for i in range(len(pairs))]

torch.set_num_threads(1)
run_dir = Path(sys.argv[1])
cfg = load_config(resolve_config_path("tiny"), sys.argv[2:])
trainer = Trainer(cfg, run_dir)
trainer.train()
digest = hashlib.sha256()
for name, p in sorted(trainer.model.named_parameters()):
    if p.requires_grad:
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
fingerprint = {"weights": digest.hexdigest(), "bank": trainer.bank.fingerprint() if trainer.bank else None}
(run_dir / f"rank-{trainer.acc.process_index}.json").write_text(json.dumps(fingerprint))
