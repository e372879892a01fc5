"""The evaluation harness and its pictures: tables, JSON, image grids and finetune's training report.

The measurements themselves live in :mod:`sami_adapter.evaluation`, :mod:`sami_adapter.noise_levels` and
:mod:`sami_adapter.representation` (and the array-level scores in
:mod:`sami_adapter.metrics`), the plots in :mod:`sami_adapter.plotting`; ``examples/finetune.py``,
``evaluate.py``, ``compare.py`` and ``rate_sweep.py`` write their results with the helpers here.

* :func:`flat_metrics` / :func:`metrics_table_markdown`: one table, one column per model (mean ±
  std over seeds when a column holds several runs); :func:`rate_study_table`: the rate study's table.
* :func:`axes_to_json`, :func:`profile_to_json`, :func:`write_json`: strict JSON of the measurements.
* :func:`traversal_rows`: the traversal picture (image grids: :mod:`sami_adapter.images`).
* :func:`write_report`: the end-of-training report of ``examples/finetune.py``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .encoder import ACTIVE_KL_NATS, TRAVERSAL_RANGE
from .evaluation import active_dimensions, disk_reconstruction_r2, guidance_gain, informative_dimensions, reconstructions
from .noise_levels import INFORMATION_MEASURE
from .images import model_from_unit, save_image_grid, unit_from_model
from .usefulness import usefulness_rows


COUNT_ROWS = ("training steps", "training seconds")  # table rows shown as whole numbers


# ---------------------------------------------------------------------------------------- markdown and JSON
def axes_to_json(axes: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-ready summary of :func:`~sami_adapter.noise_levels.discover_axes` (the per-image codes are left out)."""
    out = profile_to_json(axes["profile"], axes["levels"])
    out["measure"] = INFORMATION_MEASURE
    out["active_dims"] = axes["levels"]["active"]
    if "alignment" in axes:
        out["alignment"] = {k: to_jsonable(v) for k, v in axes["alignment"].items()}
        out["factor_dims"] = to_jsonable(axes["factor_dims"])
        out["factor_noise_levels"] = to_jsonable(axes["factor_noise_levels"])
        out["factor_order"] = axes["factor_order"]
    return out


def mechanism_markdown(table: Dict[str, Any]) -> str:
    """The :func:`~sami_adapter.noise_levels.mechanism_table` as a markdown table."""
    lines = ["| dimension | codes | rank corr | t* (dimension) | noise scale of the factor |", "|---|---|---|---|---|"]
    lines += [f"| z{r['dim']} | {r['factor']} | {r['rank_corr']:.2f} | {format_value(r['t_star'], '.0f')} | {format_value(r['factor_noise_scale'], '.0f')} |"
              for r in table["rows"]]
    return "\n".join(lines + ["", f"Spearman of t* against the factor's noise scale over the measured dimensions: {format_value(table['spearman'], '.2f')}."])


def format_value(value: float, spec: str = ".3g") -> str:
    """A number for a table: ``–`` for a missing or NaN value, ``∞`` for an infinite one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def profile_table_markdown(
    profile: Dict[str, Any],
    levels: Dict[str, Any],
    alignment: Optional[Dict[str, Any]] = None,
    include_inactive: bool = False,
) -> str:
    """A Markdown table of the characteristic noise levels, one row per dimension, ordered by t*.

    Columns: dimension, clean KL (nats), clean information (nats), t*, ``s_{t*}``, ``log SNR(t*)``
    and, with ``alignment`` (:func:`factor_alignment`), the best-matching factor and its ``|corr|``.
    Censored dimensions (information kept beyond the grid) show ``> t_max``.
    """
    kl0 = np.asarray(profile["kl"])[0]
    rows = list(levels["order"])
    if include_inactive:
        rows += [i for i in range(kl0.size) if i not in rows]
    head = ["dim", "clean KL to prior (nats)", "I_i(0) (nats)", f"t* ({levels['fraction']:g} of I_i(0))", "s_t*", "log SNR(t*)"]
    if alignment is not None:
        head += ["best factor", f"abs. {alignment['method']} corr."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_max = int(np.asarray(profile["timesteps"])[-1])
    for i in rows:
        if levels["censored"][i]:
            t_cell, s_cell, snr_cell = f"> {t_max}", "–", "–"
        else:
            t_cell = format_value(float(levels["timestep"][i]), ".1f")
            s_cell = format_value(float(levels["sigma"][i]), ".3f")
            snr_cell = format_value(float(levels["log_snr"][i]), ".2f")
        cells = [f"z{i}" + ("" if i in levels["active"] else " (inactive)"), format_value(float(kl0[i]), ".3f"),
                 format_value(float(levels["clean_information"][i]), ".3f"), t_cell, s_cell, snr_cell]
        if alignment is not None:
            cells += [alignment["best_factor"][i], format_value(float(alignment["best_score"][i]), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_to_json(profile: Dict[str, Any], levels: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """JSON-ready copy of a profile (and characteristic levels): arrays become lists, inf/NaN become None.

    ``alphas_cumprod`` is left out (it belongs to the scheduler, not to the measurement).
    """
    out: Dict[str, Any] = {"profile": {k: to_jsonable(v) for k, v in profile.items() if k != "alphas_cumprod"}}
    if levels is not None:
        out["characteristic_noise_levels"] = {k: to_jsonable(v) for k, v in levels.items()}
    return out


def flat_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """One row label -> value per scalar of a :func:`representation_metrics` result (plus
    ``usefulness``, ``trajectories`` and ``elbo`` entries when present), in table order."""
    rows: Dict[str, float] = {}
    if "mig" in result:
        rows["MIG"] = result["mig"]
        for name, value in result.get("mig_per_factor", {}).items():
            rows[f"MIG {name}"] = value
        rows["DCI disentanglement"] = result["dci"]["disentanglement"]
        rows["DCI completeness"] = result["dci"]["completeness"]
        rows["DCI informativeness (test acc.)"] = result["dci"]["informativeness_test"]
        rows["SAP"] = result["sap"]
        rows["modularity"] = result["modularity"]
        rows["explicitness (test AUC)"] = result["explicitness"]
        rows["FactorVAE score (eval acc.)"] = result["factor_vae"]["eval_accuracy"]
        for name, value in result["linear_r2"].items():
            rows[f"linear R² {name}"] = value
    rows.update(usefulness_rows(result.get("usefulness")))
    traj = result.get("trajectories")
    if traj:
        rows["trajectory curvature, latent (deg)"] = traj["latent"]
        rows["trajectory curvature, pixels (deg)"] = traj["pixels"]
    elbo = result.get("elbo")
    if elbo:
        rows["ELBO (bits/dim, continuous)"] = elbo["bpd"]
    training = result.get("training")
    if training:
        rows[COUNT_ROWS[0]] = training.get("steps", float("nan"))
        rows[COUNT_ROWS[1]] = training.get("seconds", float("nan"))
    return {k: float(v) if v is not None else float("nan") for k, v in rows.items()}


def aggregate(runs: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean, standard deviation (ddof=0) and count of each row over several runs (NaNs ignored)."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    out = {}
    for key in keys:
        values = np.array([run.get(key, np.nan) for run in runs], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "n": int(finite.size),
        }
    return out


def format_stat(stat: Optional[Dict[str, float]], count: bool = False, spec: Optional[str] = None) -> str:
    """An :func:`aggregate` entry as ``mean ± std`` (the mean alone for one run); ``spec`` by default ``.3f``, and
    whole numbers for counts and large values."""
    if stat is None or not math.isfinite(stat["mean"]):
        return "–"
    mean = stat["mean"]
    spec = spec or (".0f" if abs(mean) >= 100 or count else ".3f")
    if stat["n"] > 1:
        return f"{mean:{spec}} ± {stat['std']:{spec}}"
    return f"{mean:{spec}}"


def metrics_table_markdown(columns: Dict[str, Union[Dict[str, float], Sequence[Dict[str, float]]]]) -> str:
    """A Markdown table with one column per model and one row per metric.

    Args:
        columns: model name -> :func:`flat_metrics` dict, or a list of them (several seeds; cells
            then show ``mean ± std``).
    """
    stats = {name: aggregate(runs if isinstance(runs, (list, tuple)) else [runs]) for name, runs in columns.items()}
    rows: List[str] = []
    for per_model in stats.values():
        rows += [r for r in per_model if r not in rows]
    lines = ["| metric | " + " | ".join(stats) + " |", "|---|" + "---|" * len(stats)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(format_stat(per_model.get(row), row in COUNT_ROWS) for per_model in stats.values()) + " |")
    return "\n".join(lines)


# The rate study's columns: a row label -> (format, markdown header).
RATE_STUDY_COLUMNS = {
    "information_lower": (".2f", "I(x;z) lower"), "information_upper": (".2f", "I(x;z) upper"), "kl": (".2f", "KL"),
    "active_dims": (".1f", "active dims"), "MIG": (".3f", "MIG"), "DCI disentanglement": (".3f", "DCI-D"),
    "prior clean fraction": (".3f", "prior clean"), "reconstruction R² (x, y, radius mean)": (".3f", "rec R² x/y/r"),
    "guidance gain": (".3f", "gain"),
}


def rate_study_rows(summaries: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One flat row per model with rate-study measurements in ``compare.py``'s compare.json summaries."""
    rows = []
    for summary in summaries:
        for name, runs in summary["runs"].items():
            for run in (r for r in runs if "study" in r):
                st = run["study"]
                rec = st.get("reconstruction_r2") or {}
                rows.append({
                    "dataset": summary["dataset"], "method": run.get("method", name), "setting": run.get("setting", name),
                    "seed": run.get("seed"), "MIG": run["mig"], "DCI disentanglement": run["dci"]["disentanglement"],
                    "information_lower": st["information_lower"], "information_upper": st["information_upper"], "kl": st["kl"],
                    "active_dims": st["active_dims"], "prior clean fraction": st.get("prior_clean_fraction"),
                    "reconstruction R² (x, y, radius mean)": float(np.mean([rec[k] for k in ("x", "y", "radius") if k in rec])) if rec else None,
                    "reconstruction_r2": rec, "guidance gain": st.get("guidance_gain"),
                })
    return rows


def rate_study_table(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """:func:`aggregate` of the rows of each (dataset, method, setting): every :data:`RATE_STUDY_COLUMNS` entry
    as ``{"mean", "std", "n"}`` over the seeds (None where no seed measured it), and the seeds whose code
    carries less than ``ACTIVE_KL_NATS`` of information (``collapsed_seeds``)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["setting"]), []).append(row)
    table = []
    for (dataset, method, setting), runs in sorted(groups.items()):
        stats = aggregate([{k: r[k] for k in RATE_STUDY_COLUMNS} for r in runs])
        table.append({"dataset": dataset, "method": method, "setting": setting, "seeds": [r["seed"] for r in runs],
                      **{k: stats[k] if stats[k]["n"] else None for k in RATE_STUDY_COLUMNS},
                      "collapsed_seeds": sum(r["information_lower"] < ACTIVE_KL_NATS for r in runs)})
    return table


def rate_study_markdown(table: Sequence[Dict[str, Any]]) -> str:
    """The rate study's report: one section per dataset, its metric-against-rate figure and its table."""
    lines = ["# Rate study: disentanglement against the information in the code", "",
             "Each row: mean ± std over seeds. `I(x; z)` is bracketed by the mixture lower bound (at most log N) and the "
             "moment-matched upper bound, in nats, measured the same way for every method on the same held-out images. "
             "A disentanglement score on a code with almost no information does not count: read it next to the rate.", ""]
    heads = [head for _, head in RATE_STUDY_COLUMNS.values()]
    for dataset in sorted({t["dataset"] for t in table}):
        lines += [f"## {dataset}", "", f"![metrics against rate](rate_{dataset}.png)", "",
                  "| method | setting | seeds | " + " | ".join(heads) + " | collapsed |", "|---" * (len(heads) + 4) + "|"]
        for t in (t for t in table if t["dataset"] == dataset):
            cells = [format_stat(t[k], spec=spec) for k, (spec, _) in RATE_STUDY_COLUMNS.items()]
            lines.append(f"| {t['method']} | {t['setting']} | {len(t['seeds'])} | " + " | ".join(cells) + f" | {t['collapsed_seeds']} |")
        lines.append("")
    return "\n".join(lines)


def to_jsonable(value: Any) -> Any:
    """numpy/torch values and containers -> plain Python, with non-finite floats as None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as strict JSON (:func:`to_jsonable`: arrays as lists, inf/NaN as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
    return path


# ---------------------------------------------------------------------------------------- pictures
@torch.no_grad()
def traversal_rows(
    pipe: Any,
    image: torch.Tensor,
    dims: Sequence[int],
    values: Union[Sequence[float], Sequence[Sequence[float]]],
    num_inference_steps: int = 50,
    seed: int = 0,
    sami_scale: float = 1.0,
    max_batch: int = 64,
) -> torch.Tensor:
    """One traversal row per dimension in ``dims``, stacked: (len(dims) * len(values), C, H, W) in [-1, 1] on the CPU.

    :meth:`~sami_adapter.SAMIPipeline.traverse` from the posterior mean of ``image`` (one list of
    ``values`` for every row, or one per row), with DDIM eta 0 and one initial noise (from ``seed``)
    for every row, so within and across rows only the code changes; decoded ``max_batch`` images at a time.
    """
    out = pipe.traverse(unit_from_model(image[:1]), list(dims), values, generator=torch.Generator().manual_seed(seed),
                        max_batch_size=max_batch, num_inference_steps=num_inference_steps, eta=0.0, output_type="pt", sami_scale=sami_scale)
    return model_from_unit(out.images.cpu())


# ---------------------------------------------------------------------------------------- training report
def write_report(
    pipe: Any,
    images: torch.Tensor,
    report_dir: str,
    noise_scheduler: Any,
    seed: int = 0,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    sami_scale: float = 1.0,
    disk_factors: Optional[str] = None,
) -> Dict[str, object]:
    """Held-out measurements and pictures of a trained adapter: report.json, report.md and PNGs.

    Args:
        pipe: the :class:`~sami_adapter.SAMIPipeline` of the adapter.
        images: (N, C, H, W) held-out images in [-1, 1].
        report_dir: output folder (created).
        noise_scheduler: the training scheduler (``betas``, ``alphas_cumprod``) of the guidance gain.
        seed: seed of the noise, timesteps and sampling.
        num_inference_steps: DDIM steps of reconstructions and traversals.
        eta: DDIM eta of reconstructions (traversals use 0, so a row shares its randomness).
        sami_scale: when not 1, reconstructions are also measured and drawn at this scale.
        disk_factors: the dataset of the images when its factors can be measured on an image
            (``"disks"`` or ``"background_disks"``): the report then gives the reconstruction R² per factor.
    """
    os.makedirs(report_dir, exist_ok=True)
    model_inputs = pipe.preprocess(unit_from_model(images))  # VAE latents for latent diffusion, the images otherwise
    unet_kwargs = {}
    if pipe.is_text_conditioned:
        unet_kwargs = {"encoder_hidden_states": pipe.encode_prompt(batch_size=1)[0]}
    gains = guidance_gain(pipe.unet, pipe.encoder, noise_scheduler, model_inputs, seed=seed, unet_kwargs=unet_kwargs)
    kl = gains.pop("kl_per_dim")
    mean_variance = gains.pop("mean_variance_per_dim")
    order = sorted(range(len(kl)), key=lambda i: -kl[i])
    active = active_dimensions(kl)
    report: Dict[str, object] = {
        "guided_loss": round(gains["guided_loss"], 3),
        "unguided_loss": round(gains["unguided_loss"], 3),
        "relative_guidance_gain": round(gains["relative_gain"], 4),
        "band_gain": {k: round(v, 4) for k, v in gains["band_gain"].items()},
        "kl_per_dim": [round(v, 3) for v in kl],
        "active_dims": len(active),
        "informative_dims": len(informative_dimensions(mean_variance)),
        "mean_variance_per_dim": [round(v, 3) for v in mean_variance],
    }
    n_show = min(8, images.shape[0])
    if disk_factors:
        rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta, dataset=disk_factors)
        report["reconstruction_r2"] = {k: round(v, 3) for k, v in rec["r2"].items()}
        recon = rec["reconstructions"][:n_show]
        if sami_scale != 1.0:  # also decode with sharpened guidance (same noise): the exact decoder's spread vs its modes
            rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta, sami_scale=sami_scale,
                                         dataset=disk_factors)
            report["reconstruction_sami_scale"] = sami_scale
            report["reconstruction_r2_scaled"] = {k: round(v, 3) for k, v in rec["r2"].items()}
            recon = torch.cat([recon, rec["reconstructions"][:n_show]])
    else:
        recon = reconstructions(pipe, images[:n_show], num_inference_steps, eta, seed)
    save_image_grid(torch.cat([images[:n_show].cpu(), recon]), os.path.join(report_dir, "reconstructions.png"), nrow=n_show, scale=4)
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, 9).tolist()
    rows = traversal_rows(pipe, images[:1], order[: max(len(active), 1)], values, num_inference_steps, seed)
    save_image_grid(rows, os.path.join(report_dir, "traversals.png"), nrow=len(values), scale=4)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# SAMI adapter report", "",
        f"Held-out images: {images.shape[0]}. Guided vs unguided denoising error (same noise, stratified timesteps):",
        f"{report['guided_loss']} vs {report['unguided_loss']} (relative gain {report['relative_guidance_gain']:.1%}).", "",
        "| noise band (t) | " + " | ".join(report["band_gain"]) + " |", "|---" * (len(report["band_gain"]) + 1) + "|",
        "| guidance gain | " + " | ".join(f"{v:.1%}" for v in report["band_gain"].values()) + " |", "",
        f"Active dimensions (KL > {ACTIVE_KL_NATS:g} nats): {len(active)} of {len(kl)}. KL per dimension: {report['kl_per_dim']}", "",
        f"Informative dimensions (Var_x of the posterior mean > 0.01): {report['informative_dims']}. "
        f"Variance of the mean per dimension: {report['mean_variance_per_dim']}", "",
    ]
    if "reconstruction_r2" in report:
        names = list(report["reconstruction_r2"])
        lines += ["Reconstruction R² from z = posterior mean (image moments of input vs reconstruction):", "",
                  "| sami_scale | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| 1 (exact) | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2"].values()) + " |"]
        if "reconstruction_r2_scaled" in report:
            lines += [f"| {report['reconstruction_sami_scale']:g} | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2_scaled"].values()) + " |"]
        lines += [""]
    rows_text = "Top row inputs, then reconstructions" + (
        f" at sami_scale 1 and {report['reconstruction_sami_scale']:g}." if "reconstruction_r2_scaled" in report else ".")
    lines += ["![reconstructions](reconstructions.png)", "", rows_text, "",
              "![traversals](traversals.png)", "", f"One row per active dimension (by KL), values {values[0]} to {values[-1]}.", ""]
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return report
