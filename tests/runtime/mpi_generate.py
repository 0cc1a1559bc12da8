"""Run under mpirun by the tests: every rank loads its engine file, generates, and saves what it returned.
Arguments: ENGINE OUT [KERNEL] [NUM_BEAMS END_ID] (beam search with cumulative and per-token log probabilities)."""

import sys
from pathlib import Path

import torch

from pipeline.runtime import ModelRunner
from tests.runtime.test_multirank import PROMPTS

engine, out = Path(sys.argv[1]), Path(sys.argv[2])
runner = ModelRunner.from_dir(engine, kernel=sys.argv[3] if len(sys.argv) > 3 else "auto")
beams = int(sys.argv[4]) if len(sys.argv) > 4 else 1
if beams > 1:
    result = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=10, end_id=int(sys.argv[5]), pad_id=0,
                             num_beams=beams, return_dict=True, output_cum_log_probs=True, output_log_probs=True)
else:
    result = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=10, end_id=-1, pad_id=0,
                             return_dict=True, output_generation_logits=True)
torch.save(result, out / f"rank{runner.dist.rank}.pt")
