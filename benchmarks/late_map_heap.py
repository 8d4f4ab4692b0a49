"""Heap growth of a neuron's target map (``farm.specialize._late_map``) over a job's memory-mapped
layer-2 activations, with a farm task's allocator (``keep_freed_memory``): farm's (one tensor made
up front) against the per-batch maps joined at the end that it replaced. Each case in a fresh
process of 1 torch thread; needs the job's cached activations (run the job first).

    python benchmarks/late_map_heap.py --config configs/v4_190923_k35.yaml --neuron 190923:30
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _joined(model, index, a2, batch_size=256):
    """The replaced version: a list of per-batch maps, joined at the end."""
    import torch

    model.eval()
    w, b = model.mixing.weight[index:index + 1], model.mixing.bias[index:index + 1]
    with torch.no_grad():
        return torch.cat([torch.nn.functional.conv2d(model.layer_act(4, model.layer_act(3, a2[s:s + batch_size])),
                                                     w, b)[:, 0].float() for s in range(0, len(a2), batch_size)])


def _anon_mb() -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) // 1024


def case(config: str, neuron: str, which: str) -> dict:
    import torch

    from farm.compress import CompressConfig
    from farm.config import load_job_config
    from farm.shared_features import load_early_features
    from farm.shared_start import load_shared_start
    from farm.specialize import _late_map
    from farm.task_env import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    cfg = load_job_config(config)
    cc = CompressConfig.from_dict(cfg.compress)
    shared = load_shared_start(cc.shared.path, [neuron])
    files = sorted((Path(cfg.out_dir) / "shared_features").glob("*/early.npy"))
    for f in files:
        meta = json.loads((f.parent / "early.json").read_text())
        if meta["shape"][-1] == shared.spec.filters[2]:
            break
    else:
        sys.exit(f"no cached layer-2 activations of width {shared.spec.filters[2]} under {cfg.out_dir}/shared_features")
    n = meta["shape"][0] // (2 if cc.specialize.flip else 1)
    a2 = load_early_features(f, n, cc.specialize.flip, shared)
    before, cpu = _anon_mb(), time.process_time()
    fn = _late_map if which == "farm" else _joined
    with torch.no_grad():
        m = fn(shared, shared.spec.neuron_ids.index(neuron), a2)
    return {"case": which, "maps": list(m.shape), "anon_mb_before": before, "anon_mb_after": _anon_mb(),
            "cpu_s": round(time.process_time() - cpu, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/v4_190923_k35.yaml")
    p.add_argument("--neuron", default="190923:30")
    p.add_argument("--case", choices=["farm", "joined"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(case(a.config, a.neuron, a.case)), flush=True)
        return
    print("| case | maps | RssAnon before -> after (MB) | CPU-s |\n|---|---|---|---|")
    for which in ("joined", "farm"):
        out = subprocess.run([sys.executable, __file__, "--config", a.config, "--neuron", a.neuron, "--case", which],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {which} | {r['maps']} | {r['anon_mb_before']:,} -> {r['anon_mb_after']:,} | {r['cpu_s']} |", flush=True)


if __name__ == "__main__":
    main()
