#!/usr/bin/env python
"""The real-images study: how useful, faithful and labelled-attribute-aligned each model's code is on ``digits``.

    python examples/digits_study.py RUNS_DIR --output_dir docs/real-images

Reads every model folder under ``RUNS_DIR`` (a SAMI adapter written by ``finetune.py``, or a baseline
saved by ``compare.py --save_models``: β-VAE, DiffAE, PDAE) and scores it on the fixed held-out split of
``digits`` (``sami_adapter.data.digits``), the same way for every model:

* **usefulness**: the posterior means of all 1438 ``train`` scans fit a standardised logistic regression
  and a 5-nearest-neighbour classifier of the digit class; their accuracy on all 359 ``test`` scans
  (``linear probe``, ``kNN``), and 5-fold cross-validated accuracy over the test codes;
* **faithfulness**: reconstruction MSE and SSIM (pixels in [0, 1]) of the first ``--num_reconstructions``
  test scans, DDIM-50 with eta 1 from the posterior mean; SAMI at the exact decoder (``sami_scale`` 1)
  and at the best of ``--sami_scales``;
* **code size**: the moment-matched upper bound on ``I(x; z)`` over the test scans, in nats
  (:func:`sami_adapter.rate.information_upper_bound`), and the data-mean KL;
* **attributes found without labels**: the best single dimension's |Spearman| with each measured
  attribute (ink, slant, width, height), and where that dimension sits in the order of characteristic
  noise levels (SAMI: the order the explorer's sliders use);
* **accuracy along training**: the linear probe at every checkpoint a run kept (``checkpoint-N``).

PCA of the pixels and the raw pixels are scored alongside as references. Writes ``digits_study.json``,
``digits_study.md`` and the pictures (reconstructions, traversals, an interpolation, accuracy against steps).
Run names are ``<method>-d<latent_dim>-s<seed>``; rows aggregate seeds (mean ± std).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import Any, Dict, List

import numpy as np
import torch

from sami_adapter import SAMIPipeline
from sami_adapter.data import digit_split
from sami_adapter.images import unit_from_model
from sami_adapter.metrics import ssim
from sami_adapter.rate import information_upper_bound

ATTRIBUTES = ("ink", "slant", "width", "height")
RUN_NAME = re.compile(r"^(?P<method>.+)-d(?P<dim>\d+)-s(?P<seed>\d+)$")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", help="Folder of model folders named <method>-d<latent_dim>-s<seed>.")
    p.add_argument("--output_dir", default="docs/real-images", help="Where the table, JSON and pictures go.")
    p.add_argument("--resolution", type=int, default=16, help="Image side the models were trained at.")
    p.add_argument("--num_reconstructions", type=int, default=128, help="Held-out scans decoded for MSE/SSIM.")
    p.add_argument("--sami_scales", default="1,2,3", help="SAMI scales tried for the best-scale reconstruction row.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of every decode.")
    p.add_argument("--reference_dims", default="8,32", help="Sizes of the PCA references.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the decodes' noise.")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ loading


def load_model(path: str):
    """A SAMI adapter (``sami_adapter_config.json``) or a saved baseline (its ``config.json`` names the class)."""
    if os.path.exists(os.path.join(path, "sami_adapter_config.json")):
        pipe = SAMIPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    with open(os.path.join(path, "config.json")) as f:
        name = json.load(f)["_class_name"]
    from sami_adapter import baselines

    return getattr(baselines, name).from_pretrained(path)


def checkpoint_encoders(path: str) -> Dict[int, Dict[str, torch.Tensor]]:
    """The encoder weights of every ``checkpoint-N`` a finetune run kept (accelerate's ``model.safetensors`` of the
    objective, whose encoder keys start with ``encoder.``), by step."""
    from safetensors.torch import load_file

    found = {}
    for ckpt in glob.glob(os.path.join(path, "checkpoint-*")):
        step = ckpt.rsplit("-", 1)[-1]
        weights = os.path.join(ckpt, "model.safetensors")
        if step.isdigit() and os.path.exists(weights):
            state = load_file(weights)
            found[int(step)] = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return dict(sorted(found.items()))


# ------------------------------------------------------------------------------------------ measurements


@torch.no_grad()
def posterior(model, images: np.ndarray, batch_size: int = 256):
    """Posterior means and log-variances (N, D) of images (N, 1, H, W) in [-1, 1]."""
    means, logvars = [], []
    for s in range(0, len(images), batch_size):
        post = model.encode(unit_from_model(torch.from_numpy(images[s : s + batch_size])))
        means.append(post.mean.float().cpu())
        logvars.append(post.logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


def code_scores(z_train: np.ndarray, z_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, v_test: np.ndarray) -> Dict[str, Any]:
    """Usefulness of a representation (class probes) and its best single dimension per measured attribute."""
    from sami_adapter.usefulness import best_dimensions, label_usefulness

    out: Dict[str, Any] = {k: v for k, v in label_usefulness(z_train, y_train, z_test, y_test).items() if isinstance(v, float)}
    for name, best in best_dimensions(z_test, v_test[:, 1:], ATTRIBUTES).items():
        out[f"best ρ {name}"], out[f"best dim {name}"] = best["abs_spearman"], best["dim"]
    return out


@torch.no_grad()
def reconstruction_scores(model, images: np.ndarray, steps: int, seed: int, **decode_kwargs) -> Dict[str, Any]:
    """MSE and SSIM in [0, 1] pixels of decodes of the posterior mean (DDIM, eta 1, noise from ``seed``)."""
    from sami_adapter.report import reconstructions

    decoded = unit_from_model(reconstructions(model, torch.from_numpy(images), num_inference_steps=steps, eta=1.0, seed=seed, **decode_kwargs))
    target = unit_from_model(torch.from_numpy(images))
    return {"mse": float(((decoded - target) ** 2).mean()), "ssim": float(ssim(decoded, target).mean()), "decoded": decoded}


def characteristic_order(pipe, images: np.ndarray, seed: int) -> List[int]:
    """Active dimensions of a SAMI adapter ordered by characteristic noise level (low noise first), as the explorer orders them."""
    from sami_adapter.noise_levels import characteristic_noise_levels, information_profile

    profile = information_profile(pipe, torch.from_numpy(images[:256]), generator=torch.Generator().manual_seed(seed))
    return [int(d) for d in characteristic_noise_levels(profile)["order"]]


def score_model(model, data: Dict[str, np.ndarray], args, scales: List[float]) -> Dict[str, Any]:
    """Every number of one model's final weights (see the module docstring)."""
    (x_tr, f_tr, _), (x_te, f_te, v_te) = data["train"], data["test"]
    m_tr, _ = posterior(model, x_tr)
    m_te, lv_te = posterior(model, x_te)
    row = code_scores(m_tr.numpy(), m_te.numpy(), f_tr[:, 0], f_te[:, 0], v_te)
    row["I(x;z) upper (nats)"] = float(information_upper_bound(m_te.double(), lv_te.double()))
    row["latent_dim"] = int(m_te.shape[1])
    held = x_te[: args.num_reconstructions]
    if isinstance(model, SAMIPipeline):
        from sami_adapter.encoder import LatentPosterior

        row["KL (nats)"] = float(LatentPosterior(torch.cat([m_te, lv_te], -1).double()).kl_per_dim().mean(0).sum())
        by_scale = {s: reconstruction_scores(model, held, args.num_inference_steps, args.seed, sami_scale=s) for s in scales}
        best = min(by_scale, key=lambda s: by_scale[s]["mse"])
        row.update({"MSE": by_scale[1.0]["mse"], "SSIM": by_scale[1.0]["ssim"], "best sami_scale": best,
                    "MSE, best scale": by_scale[best]["mse"], "SSIM, best scale": by_scale[best]["ssim"]})
        row["_decoded"] = by_scale[best]["decoded"]
    else:
        rec = reconstruction_scores(model, held, args.num_inference_steps, args.seed)
        row.update({"MSE": rec["mse"], "SSIM": rec["ssim"]})
        row["_decoded"] = rec["decoded"]
    return row


def accuracy_along_training(pipe, path: str, data) -> Dict[int, float]:
    """Linear-probe accuracy of the encoder at every kept checkpoint of a SAMI run (and at its end)."""
    from sami_adapter.usefulness import label_usefulness

    final = {k: v.clone() for k, v in pipe.encoder.state_dict().items()}
    (x_tr, f_tr, _), (x_te, f_te, _) = data["train"], data["test"]
    curve = {}
    for step, state in checkpoint_encoders(path).items():
        pipe.encoder.load_state_dict(state)
        curve[step] = label_usefulness(posterior(pipe, x_tr)[0].numpy(), f_tr[:, 0], posterior(pipe, x_te)[0].numpy(), f_te[:, 0])["linear_probe"]
    pipe.encoder.load_state_dict(final)
    return curve


def pixel_references(data, dims: List[int]) -> Dict[str, Dict[str, Any]]:
    """PCA of the pixels (fit on the train scans) at each size, and the raw pixels: scores and PCA reconstructions."""
    from sami_adapter.usefulness import pca_codes

    (x_tr, f_tr, _), (x_te, f_te, v_te) = data["train"], data["test"]
    flat_tr, flat_te = x_tr.reshape(len(x_tr), -1).astype(np.float64), x_te.reshape(len(x_te), -1).astype(np.float64)
    target = (x_te + 1) / 2
    rows = {}
    for d in dims:
        c_tr, c_te = pca_codes(x_tr, x_te, d)
        row = code_scores(c_tr, c_te, f_tr[:, 0], f_te[:, 0], v_te)
        # The PCA decoder: least squares from the training codes back to the pixels (the projection's transpose).
        back, *_ = np.linalg.lstsq(np.c_[c_tr, np.ones(len(c_tr))], flat_tr, rcond=None)
        recon = np.clip((np.c_[c_te, np.ones(len(c_te))] @ back + 1) / 2, 0, 1).reshape(x_te.shape)
        row.update({"MSE": float(((recon - target) ** 2).mean()), "SSIM": float(ssim(recon, target).mean()), "latent_dim": d})
        rows[f"PCA of pixels-d{d}"] = row
    raw = code_scores(flat_tr, flat_te, f_tr[:, 0], f_te[:, 0], v_te)
    raw["latent_dim"] = flat_te.shape[1]
    rows[f"raw pixels-d{flat_te.shape[1]}"] = raw
    return rows


# ------------------------------------------------------------------------------------------ the study


def runs_in(runs_dir: str) -> List[Dict[str, Any]]:
    """Model folders of ``runs_dir`` named ``<method>-d<latent_dim>-s<seed>``, sorted."""
    found = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*"))):
        m = RUN_NAME.match(os.path.basename(path))
        if m and os.path.isdir(path):
            found.append({"path": path, "method": m["method"], "dim": int(m["dim"]), "seed": int(m["seed"]), "name": os.path.basename(path)})
    return found


def aggregate_rows(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Rows named ``<method>-d<D>-s<seed>`` (or ``<name>-d<D>``) grouped by ``<method>-d<D>``: mean, std, n of every number."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for name, row in rows.items():
        key = re.sub(r"-s\d+$", "", name)
        groups.setdefault(key, []).append(row)
    out = {}
    for key, members in groups.items():
        keys = [k for k in members[0] if not k.startswith("_") and isinstance(members[0][k], (int, float)) and not k.startswith("best dim")]
        out[key] = {k: {"mean": float(np.mean([m[k] for m in members])), "std": float(np.std([m[k] for m in members])), "n": len(members)}
                    for k in keys}
    return out


COLUMNS = ("linear_probe", "linear_probe_cv5", "knn", "knn_cv5", "I(x;z) upper (nats)", "MSE", "SSIM", "MSE, best scale", "best ρ ink",
           "best ρ slant", "best ρ width")


def table_markdown(groups: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    from sami_adapter.report import format_stat

    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for key in sorted(groups, key=lambda k: (int(k.rsplit("-d", 1)[1]), k)):
        stats = groups[key]
        n = max(s["n"] for s in stats.values())
        cells = [format_stat(stats[c]) if c in stats else "—" for c in COLUMNS]
        lines.append(f"| {key} (n={n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_pictures(models: Dict[str, Any], rows: Dict[str, Dict[str, Any]], data, curves, args) -> List[str]:
    """Reconstructions (input, then one row per model), SAMI's traversals and an interpolation, the accuracy curve."""
    from sami_adapter.plotting import plot_accuracy_curve
    from sami_adapter.report import save_image_grid, traversal_rows

    out = []
    x_te = data["test"][0]
    shown = 12
    grid = [unit_from_model(torch.from_numpy(x_te[:shown]))] + [rows[n]["_decoded"][:shown] for n in models]
    out.append(save_image_grid(torch.cat(grid) * 2 - 1, os.path.join(args.output_dir, "reconstructions.png"), nrow=shown, scale=4))
    sami = [n for n, m in models.items() if isinstance(m, SAMIPipeline)]
    if sami:
        pipe, name = models[sami[0]], sami[0]
        order = rows[name].get("_order") or list(range(pipe.latent_dim))
        values = np.linspace(-2.5, 2.5, 9)
        z0 = pipe.encode(unit_from_model(torch.from_numpy(x_te[:1]))).mean
        spread = [float(v) for v in values]
        trav = traversal_rows(pipe, torch.from_numpy(x_te[:1]), order, [[float(z0[0, d]) + v for v in spread] for d in order], seed=args.seed)
        out.append(save_image_grid(trav, os.path.join(args.output_dir, "traversals.png"), nrow=len(values), scale=4))
        a, b = pipe.encode(unit_from_model(torch.from_numpy(x_te[:2]))).mean.split(1)
        inter = pipe.interpolate(a, b, steps=9, generator=torch.Generator().manual_seed(args.seed), eta=0.0, output_type="pt").images
        out.append(save_image_grid(inter.cpu() * 2 - 1, os.path.join(args.output_dir, "interpolation.png"), nrow=9, scale=4))
    if curves:
        out.append(plot_accuracy_curve(curves, os.path.join(args.output_dir, "accuracy_vs_steps.png")))
    return out


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    scales = [float(s) for s in args.sami_scales.split(",")]
    if 1.0 not in scales:
        scales = [1.0] + scales
    data = {split: digit_split(split, args.resolution) for split in ("train", "test")}
    rows: Dict[str, Dict[str, Any]] = {}
    models: Dict[str, Any] = {}
    loaded: Dict[str, Any] = {}
    curves: Dict[str, Dict[int, float]] = {}
    for run in runs_in(args.runs_dir):
        print(f"scoring {run['name']}", flush=True)
        model = load_model(run["path"])
        row = score_model(model, data, args, scales)
        if isinstance(model, SAMIPipeline):
            row["_order"] = characteristic_order(model, data["test"][0], args.seed)
            curve = accuracy_along_training(model, run["path"], data)
            train_steps = json.load(open(os.path.join(run["path"], "sami_adapter_config.json")))["training"]["max_train_steps"]
            curve[int(train_steps)] = row["linear_probe"]
            curves[run["name"]] = dict(sorted(curve.items()))
            for k in ATTRIBUTES:  # where the best dimension of each attribute sits in the noise-level order (0: lowest t*)
                d = row[f"best dim {k}"]
                row[f"noise rank {k}"] = row["_order"].index(d) if d in row["_order"] else -1
        rows[run["name"]] = row
        loaded[run["name"]] = (run, model)
    # The pictures show the first seed of each method at the smallest latent size.
    smallest = min((r["dim"] for r, _ in loaded.values()), default=None)
    for name, (run, model) in loaded.items():
        if run["dim"] == smallest and not any(r["method"] == run["method"] and r["seed"] < run["seed"] for r, _ in loaded.values() if r["dim"] == smallest):
            models[name] = model
    rows.update(pixel_references(data, [int(d) for d in args.reference_dims.split(",")]))
    groups = aggregate_rows(rows)
    os.makedirs(args.output_dir, exist_ok=True)
    pictures = draw_pictures(models, rows, data, curves, args)
    from sami_adapter.report import write_json

    result = {"runs": {n: {k: v for k, v in r.items() if k != "_decoded"} for n, r in rows.items()}, "groups": groups,
              "accuracy_vs_steps": curves, "pictures": [os.path.basename(p) for p in pictures], "reconstruction_rows": list(models)}
    write_json(os.path.join(args.output_dir, "digits_study.json"), result)
    with open(os.path.join(args.output_dir, "digits_study.md"), "w") as f:
        f.write("# digits study: the table\n\n" + table_markdown(groups) + "\n\nReconstruction rows (top to bottom after the inputs): "
                + ", ".join(models) + "\n")
    print(table_markdown(groups))
    return result


if __name__ == "__main__":
    main()
