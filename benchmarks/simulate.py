"""Benchmark the simulated population (farm.data.simulate) and, optionally, check that its neurons
are learnable.

    python benchmarks/simulate.py                       # default: 3 sessions x 20 neurons x 1000 images, 64 px
    python benchmarks/simulate.py --write /tmp/sim      # also time write_population
    python benchmarks/simulate.py --learn 2 --steps 1500   # + train a student per neuron (slow)
    python benchmarks/simulate.py --learn-neurons 5,11     # ... for chosen test-session neurons

Timing: wall-clock seconds of simulate_population with torch limited to --threads threads; the load
average is printed beside it because the machine may be shared (other processes slow it down).

Learnability check (--learn N): for N test-session neurons, a CompactModel student of
``--width-factor`` x the neuron's true widths is trained from scratch (Adam, MSE on the z-scored
true rate, BN in training mode) on fresh natural_like images (a gaudy share as in train sessions),
then scored by R² (squared Pearson r) against the true rates on held-out natural_like images. This
is a proxy for "distillation + pruning can recover the neuron at a few times its true size"; the
real pipeline (farm.compress) is not used here.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from farm.data.images import gaudy, natural_like
from farm.models.input import recenter
from farm.data.simulate import SimulationConfig, simulate_population, write_population
from farm.models.compact import build_compact


def learnability(pop, neurons: list[int], steps: int, width_factor: float, n_train: int, batch: int,
                 lr: float, seed: int) -> list[dict]:
    config = pop.config
    rng = np.random.default_rng([seed, 99])
    t0 = time.perf_counter()
    train = natural_like(config.image_size, n_train, rng)
    n_gaudy = int(config.gaudy_fraction * n_train)
    train[:n_gaudy] = gaudy(train[:n_gaudy])
    held_out = natural_like(config.image_size, 1000, rng)
    print(f"  learnability images: {time.perf_counter() - t0:.1f} s", flush=True)
    test_session = pop.sessions[-1]
    results = []
    for nid in [test_session.neuron_ids[i] for i in neurons]:
        truth = pop.ground_truth.subset([nid])
        y_train = truth.predict(train)[:, 0]
        y_test = truth.predict(held_out)[:, 0]
        mu, sd = y_train.mean(), y_train.std()
        true_widths = truth.models[0].spec.filters
        widths = [max(1, int(round(k * width_factor))) for k in true_widths]
        student = build_compact(truth.models[0].spec.with_filters(widths), seed=seed)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        target = torch.as_tensor((y_train - mu) / sd, dtype=torch.float32)
        t0 = time.perf_counter()
        curve = []
        for step in range(1, steps + 1):
            student.train()
            idx = torch.randint(0, n_train, (batch,), generator=g)
            loss = F.mse_loss(student(recenter(train[idx.numpy()]))[:, 0], target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % max(1, steps // 5) == 0 or step == steps:
                student.eval()
                with torch.inference_mode():
                    pred = torch.cat([student(recenter(held_out[s:s + 250]))[:, 0]
                                      for s in range(0, len(held_out), 250)]).numpy()
                r2 = float(np.corrcoef(pred, y_test)[0, 1] ** 2)
                curve.append((step, round(r2, 3)))
                print(f"  {nid}: step {step} loss {loss.item():.3f} held-out R2 {r2:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append({"neuron_id": nid, "true_filters": list(true_widths),
                        "true_filter_count": truth.models[0].filter_count(),
                        "student_filters": widths, "student_filter_count": student.filter_count(),
                        "r2_curve": curve, "final_r2": curve[-1][1]})
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--neurons", type=int, default=20)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="time the simulation this many times")
    p.add_argument("--write", default=None, help="also write the population to this folder and time it")
    p.add_argument("--learn", type=int, default=0, help="learnability check for this many neurons")
    p.add_argument("--learn-neurons", default=None,
                   help="comma-separated test-session neuron indices to check (default: the first --learn)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--width-factor", type=float, default=2.0)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = SimulationConfig(n_neurons=args.neurons, n_sessions=args.sessions, n_images=args.images,
                              image_size=args.image_size, seed=args.seed)
    result = {"config": config.to_dict(), "threads": args.threads, "cpu_count": os.cpu_count()}
    times, cpu_times = [], []
    for _ in range(args.repeat):
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        pop = simulate_population(config)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        # CPU seconds over threads approximates the wall time on an idle machine
        print(f"simulate_population: {times[-1]:.1f} s wall, {cpu_times[-1]:.1f} CPU s "
              f"({args.sessions} sessions x {args.neurons} neurons x {args.images} images, {args.image_size} px, "
              f"{args.threads} threads; 1-min load average before {load_before:.1f}, "
              f"after {os.getloadavg()[0]:.1f})", flush=True)
    result["simulate_s"] = times
    result["simulate_cpu_s"] = cpu_times
    rates = np.concatenate([pop.true_rates[s.session_id] for s in pop.sessions])
    counts = np.array(list(pop.ground_truth.filter_counts.values()))
    result["mean_rate_per_neuron"] = [float(np.min(rates.mean(1))), float(np.median(rates.mean(1))),
                                      float(np.max(rates.mean(1)))]
    result["true_filter_counts"] = [int(counts.min()), float(np.median(counts)), int(counts.max())]
    print(f"mean rate per neuron min/median/max {result['mean_rate_per_neuron']} spikes/100 ms; "
          f"true filter counts min/median/max {result['true_filter_counts']}")
    if args.write:
        t0 = time.perf_counter()
        write_population(pop, args.write)
        result["write_s"] = time.perf_counter() - t0
        print(f"write_population: {result['write_s']:.1f} s -> {args.write}")
    neurons = ([int(i) for i in args.learn_neurons.split(",")] if args.learn_neurons
               else list(range(args.learn)))
    if neurons:
        result["learnability"] = learnability(pop, neurons, args.steps, args.width_factor,
                                              args.train_images, args.batch, args.lr, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
