#!/usr/bin/env python
"""Collect the paper-reproduction study into one table, the mechanism figures and a traversal grid per model.

    python examples/rate_sweep.py --grid paper --output_dir paper-sweep --workers 2
    python examples/paper_study.py paper-sweep --output_dir docs/paper-reproduction

Reads every ``runs/*/compare.json`` of a sweep (``compare.py --rate_study`` on one model and seed)
and writes ``paper_study.json`` and ``paper_study.md``: per dataset and model, mean ± std over seeds
of MIG (overall and per factor), DCI (disentanglement / completeness / informativeness), the
reconstruction MSE (the paper's measure) and the exact decoder's R² per factor, the share of clean
prior samples, ``I(x; z)`` (upper bound, nats) and, for SAMI, the mechanism: each active dimension's
characteristic noise level against the noise scale of the factor it codes (Spearman over
dimensions). Each factor's own noise scale is measured once per dataset with the noisy-image probe
(:func:`sami_adapter.noise_levels.factor_recoverability`). Figures: ``mechanism-<run>.png`` per SAMI
run, ``traversals-<run>.png`` per model whose weights the sweep kept (SAMI adapters; baselines saved
with ``compare.py --save_models``), ``factor_noise_scales.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Dict, List

import numpy as np
import torch

from sami_adapter.data import DATASETS  # noqa: E402
from sami_adapter.images import unit_from_model  # noqa: E402
from sami_adapter.encoder import ACTIVE_KL_NATS  # noqa: E402
from sami_adapter.noise_levels import factor_noise_scales, factor_recoverability, mechanism_table  # noqa: E402
from sami_adapter.plotting import plot_mechanism  # noqa: E402
from sami_adapter.report import aggregate, format_stat, mechanism_markdown, save_image_grid, traversal_rows, write_json  # noqa: E402

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="Output folder of rate_sweep.py --grid paper (its runs/ and adapters/ are read).")
    p.add_argument("--output_dir", default="docs/paper-reproduction", help="Where the table and figures go.")
    p.add_argument("--probe_steps", type=int, default=300, help="Training steps of the noise-scale probe per noise level.")
    p.add_argument("--num_noise_levels", type=int, default=21, help="Noise levels of the probe.")
    p.add_argument("--traversal_steps", type=int, default=7, help="Values per traversal row.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the probe and the traversal image.")
    p.add_argument("--reuse_probe", default=None,
                   help="A paper_study.json whose factor noise scales to reuse (they depend on the data and the noise "
                        "schedule only): skips the probe for the datasets it holds.")
    return p.parse_args(argv)


def _arrays(d: Dict[str, Any]) -> Dict[str, Any]:
    """JSON lists of numbers back to float arrays (None -> NaN); lists of indices, flags or names stay lists."""
    def numeric(v):
        flat = [x for row in v for x in (row if isinstance(row, list) else [row])]
        return flat and all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in flat) \
            and not all(isinstance(x, int) for x in flat)

    return {k: np.array([[np.nan if x is None else x for x in row] if isinstance(row, list) else (np.nan if row is None else row) for row in v],
                        dtype=np.float64) if isinstance(v, list) and numeric(v) else v for k, v in d.items()}


def run_row(name: str, summary: Dict[str, Any], scales: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """One flat row (numbers and the mechanism) of one compare.json holding one model and seed."""
    (label, runs), = summary["runs"].items()
    run = runs[0]
    study = run.get("study", {})
    row: Dict[str, Any] = {"run": name, "dataset": summary["dataset"], "resolution": summary["resolution"], "method": run.get("method", label),
                           "setting": run.get("setting", label), "seed": run.get("seed")}
    values = {"MIG": run["mig"], "DCI disentanglement": run["dci"]["disentanglement"], "DCI completeness": run["dci"]["completeness"],
              "DCI informativeness": run["dci"]["informativeness_test"], "reconstruction MSE": study.get("reconstruction_mse"),
              "prior clean fraction": study.get("prior_clean_fraction"), "I(x;z) upper (nats)": study.get("information_upper"),
              "active dims": study.get("active_dims"), "guidance gain": study.get("guidance_gain"),
              "curvature, code (deg)": (run.get("trajectories") or {}).get("latent"),
              "curvature, pixels (deg)": (run.get("trajectories") or {}).get("pixels")}
    values.update({f"MIG {k}": v for k, v in run.get("mig_per_factor", {}).items()})
    values.update({f"R² {k}": v for k, v in (study.get("reconstruction_r2") or {}).items()})
    if summary.get("sami_axes"):
        axes = summary["sami_axes"][0]
        levels = _arrays(axes["characteristic_noise_levels"])
        alignment = {**axes["alignment"], "matrix": np.asarray(axes["alignment"]["matrix"], dtype=np.float64)}
        table = mechanism_table(levels, alignment, scales[summary["dataset"]])
        values["mechanism Spearman"] = table["spearman"]
        row["mechanism"] = {**table, "factor_noise_scales": scales[summary["dataset"]]}
        row["axes"] = axes
    row["values"] = {k: (float(v) if v is not None else float("nan")) for k, v in values.items()}
    return row


def traversal_grid(row: Dict[str, Any], sweep_dir: str, path: str, steps: int, seed: int) -> bool:
    """A traversal grid of the run's model (one row per active dimension, by KL), if its weights were kept."""
    from sami_adapter import SAMIPipeline
    from sami_adapter.baselines.beta_vae import BetaVAE

    dataset = DATASETS[row["dataset"]](num_samples=1, resolution=row["resolution"], seed=seed + 30_000, split="test")
    image = dataset.sample(1, np.random.default_rng([seed, 9]))[0]
    adapter = os.path.join(sweep_dir, "adapters", row["run"])
    saved = [d for d in sorted(glob.glob(os.path.join(sweep_dir, "runs", row["run"], "models", "*")))
             if json.load(open(os.path.join(d, "config.json"))).get("_class_name") == "BetaVAE"]  # DiffAE codes are not traversed here
    values = torch.linspace(-2.0, 2.0, steps).tolist()
    with torch.no_grad():
        if os.path.isdir(adapter):
            model = SAMIPipeline.from_pretrained(adapter)
            model.set_progress_bar_config(disable=True)
        elif saved:
            model = BetaVAE.from_pretrained(saved[0])
        else:
            return False
        kl = model.encode(unit_from_model(dataset.sample(256, np.random.default_rng([seed, 10]))[0])).kl_per_dim().mean(0)
        dims = [int(d) for d in torch.argsort(kl, descending=True) if kl[d] > ACTIVE_KL_NATS] or [int(kl.argmax())]
        if isinstance(model, SAMIPipeline):
            grid = traversal_rows(model, image, dims, values, num_inference_steps=50, seed=seed)
        else:
            codes = model.encode(unit_from_model(image)).mean.repeat(len(dims) * steps, 1)
            for r, d in enumerate(dims):
                codes[r * steps:(r + 1) * steps, d] = torch.tensor(values)
            grid = model.decode(codes).cpu()
    save_image_grid(grid, path, nrow=steps, scale=4)
    return True


def table_markdown(table: List[Dict[str, Any]], factor_names: Dict[str, List[str]]) -> List[str]:
    lines = []
    for dataset in sorted({t["dataset"] for t in table}):
        names = factor_names[dataset]
        cols = ["MIG"] + [f"MIG {n}" for n in names] + ["DCI disentanglement", "DCI completeness", "DCI informativeness", "reconstruction MSE"] \
            + [f"R² {n}" for n in names] + ["prior clean fraction", "I(x;z) upper (nats)", "active dims", "mechanism Spearman",
                                           "curvature, code (deg)"]
        lines += [f"### {dataset}", "", "| model | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for t in (t for t in table if t["dataset"] == dataset):
            lines.append(f"| {t['method']} ({t['setting']}) | {t['n']} | " + " | ".join(format_stat(t["stats"].get(c)) for c in cols) + " |")
        lines.append("")
    return lines


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.sweep_dir, "runs", "*", "compare.json")))
    if not files:
        raise SystemExit(f"no runs/*/compare.json under {args.sweep_dir}; run rate_sweep.py --grid paper first.")
    summaries = {os.path.basename(os.path.dirname(f)): json.load(open(f)) for f in files}
    os.makedirs(args.output_dir, exist_ok=True)
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    grid = np.round(np.linspace(0, 999, args.num_noise_levels)).astype(int).tolist()
    recover, scales, factor_names = {}, {}, {}
    earlier = json.load(open(args.reuse_probe)) if args.reuse_probe else {"recoverability": {}}
    for dataset, resolution in sorted({(s["dataset"], s["resolution"]) for s in summaries.values()}):
        data = DATASETS[dataset](num_samples=1, resolution=resolution, seed=args.seed + 40_000, split="test")
        if dataset in earlier["recoverability"]:
            recover[dataset] = {k: np.asarray(v) if k != "names" else list(v) for k, v in earlier["recoverability"][dataset].items()}
        else:
            recover[dataset] = factor_recoverability(data, alphas, grid, num_steps=args.probe_steps, seed=args.seed)
        scales[dataset] = factor_noise_scales(recover[dataset])
        factor_names[dataset] = list(data.factor_names)
        print(f"{dataset}: factor noise scales {scales[dataset]}", flush=True)
    rows = [run_row(name, s, scales) for name, s in summaries.items()]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["setting"]), []).append(row)
    table = [{"dataset": d, "method": m, "setting": st, "n": len(rs), "seeds": [r["seed"] for r in rs],
              "stats": aggregate([r["values"] for r in rs])} for (d, m, st), rs in sorted(groups.items())]
    lines = ["Mean ± std over seeds (n); every model scored on the same held-out draws. Reconstruction MSE and R² are of the "
             "decode of the posterior mean (SAMI: the exact decoder, `sami_scale` 1, DDIM 50 steps, eta 1).", ""]
    lines += table_markdown(table, factor_names)
    for row in rows:
        if "mechanism" in row:
            axes = row["axes"]
            profile = _arrays(axes["profile"])
            levels = _arrays(axes["characteristic_noise_levels"])
            plot_mechanism(profile, levels, recover[row["dataset"]], row["mechanism"], os.path.join(args.output_dir, f"mechanism-{row['run']}.png"),
                           title=row["run"])
            lines += [f"#### {row['run']}", "", mechanism_markdown(row["mechanism"]), "", f"![mechanism](mechanism-{row['run']}.png)", ""]
        if traversal_grid(row, args.sweep_dir, os.path.join(args.output_dir, f"traversals-{row['run']}.png"), args.traversal_steps, args.seed):
            row["traversals"] = f"traversals-{row['run']}.png"
    write_json(os.path.join(args.output_dir, "paper_study.json"),
               {"rows": [{k: v for k, v in r.items() if k != "axes"} for r in rows], "table": table, "factor_noise_scales": scales,
                "recoverability": {d: {"timesteps": r["timesteps"], "r2": r["r2"], "names": r["names"]} for d, r in recover.items()}})
    with open(os.path.join(args.output_dir, "paper_study.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:40]))
    return {"rows": rows, "table": table, "scales": scales}


if __name__ == "__main__":
    main()
