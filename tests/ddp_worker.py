"""Run under torchrun by test_multi_gpu.py: train through multi_gpu_train.json, then check the ranks agree."""

import json
import os
import sys

import torch
import torch.distributed as dist
from helpers import ROOT  # this script's folder, tests/, is first on sys.path
from monai.bundle import ConfigParser

sys.path.insert(0, str(ROOT))

parser = ConfigParser()
parser.read_config([os.path.join(ROOT, "configs", "train.json"), os.path.join(ROOT, "configs", "multi_gpu_train.json")])
parser.update(json.loads(sys.argv[1]))
for run_id in ("initialize", "run"):
    for i in range(len(parser[run_id])):
        parser.get_parsed_content(f"{run_id}#{i}")


def gathered(module):
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    out = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


same = {
    name: all(torch.equal(t, ts[0]) for t in ts)
    for name, ts in (
        ("segmentor", gathered(parser.get_parsed_content("network"))),
        ("critic", gathered(parser.get_parsed_content("critic"))),
    )
}
samples = torch.tensor([len(parser.get_parsed_content("train#dataset"))])
all_samples = [torch.zeros_like(samples) for _ in range(dist.get_world_size())]
dist.all_gather(all_samples, samples)
if dist.get_rank() == 0:
    report = {"same": same, "cases_per_rank": [int(s) for s in all_samples]}
    with open(os.path.join(parser["bundle_root"], "ddp_report.json"), "w") as f:
        json.dump(report, f)
for i in range(len(parser["finalize"])):
    parser.get_parsed_content(f"finalize#{i}")
