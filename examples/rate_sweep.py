#!/usr/bin/env python
"""The rate-disentanglement sweep: many SAMI settings and baselines, several at once, then one table.

    python examples/rate_sweep.py --output_dir sweep --workers 14 --deadline_seconds 480
    python examples/rate_sweep.py --output_dir sweep --grid cpu --sami_steps 2500 --baseline_steps 4000 --pretrain_steps 3000
    python examples/rate_sweep.py --collect sweep/runs/* --output_dir docs/rate-study

Every job is one model and one seed: a SAMI job runs ``examples/finetune.py`` with the job's flags
and then ``examples/compare.py --rate_study`` on the adapter; a baseline job runs
``examples/compare.py --baselines SPEC --rate_study``. Jobs run ``--workers`` at a time (one CPU
thread each; on a GPU machine start CUDA MPS first so they share the GPU), in the order of
:data:`JOBS` (most informative first), and a job is not started once ``--deadline_seconds`` has
passed, so whatever has finished is usable. ``--only`` filters jobs by name.

Each finished job leaves ``runs/<name>/compare.json``; logs go to ``logs/<name>.log``; ``progress.txt``
says what is done. Rerun with the same output folder to skip finished jobs; ``--collect`` then merges
the finished runs into the rate study's table and figures. ``--archive FILE`` packs
every run's compare.json and training log and every job log into one .tar.gz as the sweep goes (after
each finished job), for machines that hand back only a few files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from sami_adapter.plotting import plot_rate_study  # noqa: E402
from sami_adapter.report import rate_study_markdown, rate_study_rows, rate_study_table, write_json  # noqa: E402
DSPRITES_BASE = "bases/ddpm-dsprites-16"

# SAMI settings (finetune.py flags on top of the defaults). Capacity runs replace beta and free bits
# by a target on the information in z plus a penalty on the aggregate posterior's mismatch.
CAP = "--beta 0 --free_bits 0 --capacity_ramp_steps 1250 --mismatch_weight 1"
SAMI = {
    "sami-default": "",
    "sami-default-mm": "--mismatch_weight 1",
    "sami-default-int": "--intervention_weight 1",
    "sami-cap3": f"{CAP} --capacity 3",
    "sami-cap6": f"{CAP} --capacity 6",
    "sami-cap10": f"{CAP} --capacity 10",
    "sami-cap12": f"{CAP} --capacity 12",
    "sami-cap6-tc": f"{CAP} --capacity 6 --tc_weight 5 --tc_on mean",
    "sami-cap6-bands": f"{CAP} --capacity 6 --noise_bands nested",
    "sami-cap6-int": f"{CAP} --capacity 6 --intervention_weight 1",
    "sami-cap6-int-tc": f"{CAP} --capacity 6 --intervention_weight 1 --tc_weight 5 --tc_on mean",
    "sami-cap6-blind": f"{CAP} --capacity 6 --encoder_type time_blind",
    "sami-cap6-joint": f"{CAP} --capacity 6 --unet_mode full --pretrained_model_name_or_path models/ddpm-disks-16 --unet_learning_rate 2e-5",
    "sami-cap6-lora": f"{CAP} --capacity 6 --unet_mode lora",
}
METHOD = {
    "sami-default": ("SAMI (β=0.01, free bits)", "default"),
    "sami-default-mm": ("SAMI (β=0.01, free bits) + mismatch", "weight 1"),
    "sami-default-int": ("SAMI (β=0.01, free bits) + intervention", "weight 1"),
    "sami-cap3": ("SAMI capacity", "C=3"), "sami-cap6": ("SAMI capacity", "C=6"), "sami-cap10": ("SAMI capacity", "C=10"), "sami-cap12": ("SAMI capacity", "C=12"),
    "sami-cap6-tc": ("SAMI capacity + TC(mean)", "C=6"), "sami-cap6-bands": ("SAMI capacity + noise bands", "C=6"),
    "sami-cap6-int": ("SAMI capacity + intervention", "C=6"), "sami-cap6-int-tc": ("SAMI capacity + intervention + TC", "C=6"),
    "sami-cap6-blind": ("SAMI capacity, time-blind encoder", "C=6"), "sami-cap6-joint": ("SAMI capacity, joint UNet", "C=6"),
    "sami-cap6-lora": ("SAMI capacity, LoRA UNet", "C=6"),
}
BASELINES = {
    "bvae1": "beta-vae:beta=1", "bvae4": "beta-vae:beta=4", "bvae16": "beta-vae:beta=16",
    "capvae3": "capacity-vae:capacity=3,ramp=5000", "capvae6": "capacity-vae:capacity=6,ramp=5000",
    "btcvae": "beta-tcvae:tc_weight=5", "diffae": "diffae",
}

# The paper-reproduction grid (docs/paper-reproduction.md) on background_disks: the paper's recipe
# (joint from scratch, its encoder), SAMI frozen on the shipped base with the paper's encoder and with
# ours, and the β-VAE / β-TCVAE with the paper's encoder, Gaussian and Bernoulli likelihoods.
BG_BASE = "models/ddpm-background-disks-16"
SAMI.update({
    "sami-paper": "--recipe paper",
    "sami-frozen-paper-enc": f"--recipe adapter --pretrained_model_name_or_path {BG_BASE} --encoder_type paper",
    "sami-frozen-ours": f"--recipe adapter --pretrained_model_name_or_path {BG_BASE}",
})
# Levers for the x/y rotation (docs/paper-reproduction.md, part 6), on the frozen setting: one capacity
# per dimension (unequal rates, so a rotation of the code changes the posterior widths), a capacity ramp
# that starts at half its target, and a warm start from a baseline's encoder (same seed: the β-TCVAE,
# and the best tuned baseline, the Bernoulli β-VAE) whose anchor is annealed away by step 1250.
# {warm:KEY} is the saved model of baseline KEY's job.
BG_CAP = f"--recipe adapter --pretrained_model_name_or_path {BG_BASE} --beta 0 --free_bits 0 --capacity_ramp_steps 1250 --mismatch_weight 1"
SAMI.update({
    "sami-frozen-unequal": f"{BG_CAP} --capacity 4,3,2.5,1,0.5,0.25,0.1,0.1",
    "sami-frozen-capstart": f"{BG_CAP} --capacity 12 --capacity_start 0.5",
    "sami-frozen-warm": f"--recipe adapter --pretrained_model_name_or_path {BG_BASE} --init_encoder {{warm:btcvae1-gaussian}} --anchor_steps 1250",
    "sami-frozen-warm-bvae": f"--recipe adapter --pretrained_model_name_or_path {BG_BASE} --init_encoder {{warm:bvae1-bernoulli}} --anchor_steps 1250",
})
METHOD.update({
    "sami-frozen-unequal": ("SAMI frozen, unequal capacities", "4,3,2.5,1,0.5,0.25,0.1,0.1 nats"),
    "sami-frozen-capstart": ("SAMI frozen, capacity ramp from half", "C=12"),
    "sami-frozen-warm": ("SAMI frozen, warm start from the β-TCVAE", "anchor annealed over 1250 steps"),
    "sami-frozen-warm-bvae": ("SAMI frozen, warm start from the Bernoulli β-VAE", "anchor annealed over 1250 steps"),
    "sami-paper": ("SAMI, the paper's recipe", "joint from scratch"),
    "sami-frozen-paper-enc": ("SAMI frozen, paper's encoder", "shipped base"),
    "sami-frozen-ours": ("SAMI frozen, our encoder", "shipped base"),
})
BASELINES.update({f"{kind}{beta}-{lik}": f"{spec}:beta={beta},likelihood={lik},bias_free=1"
                  for kind, spec in (("bvae", "beta-vae"), ("btcvae", "beta-tcvae")) for beta in (1, 4) for lik in ("gaussian", "bernoulli")})


def job(dataset: str, kind: str, key: str, seed: int) -> Dict[str, object]:
    """One job: one model (a SAMI setting or a baseline, by its key) on one dataset with one seed."""
    return {"name": f"{dataset}-{key}-s{seed}", "kind": kind, "dataset": dataset, "key": key, "seed": seed}


def build_jobs() -> List[Dict[str, object]]:
    """Every job, most informative first: seed 0 of every setting on disks, then dsprites, then the
    other seeds of the main settings, then the other seeds of the exploratory ones."""
    main_sami = ["sami-default", "sami-cap3", "sami-cap6", "sami-cap10", "sami-cap6-tc", "sami-cap6-bands", "sami-cap6-int", "sami-cap6-joint"]
    extra_sami = [k for k in SAMI if k not in main_sami]
    dsprites_sami, dsprites_base = ["sami-default", "sami-cap6", "sami-cap6-int"], ["bvae1", "bvae4", "capvae6", "btcvae"]

    jobs: List[Dict[str, object]] = [{"name": "pretrain-dsprites", "kind": "pretrain", "dataset": "dsprites"}]
    for seed in (0, 1, 2):
        keys = main_sami + extra_sami if seed == 0 else main_sami
        jobs += [job("disks", "sami", k, seed) for k in keys] + [job("disks", "baseline", k, seed) for k in BASELINES]
        jobs += [job("dsprites", "sami", k, seed) for k in dsprites_sami] + [job("dsprites", "baseline", k, seed) for k in dsprites_base]
    jobs += [job("disks", "sami", k, seed) for seed in (1, 2) for k in extra_sami]
    return jobs


def build_cpu_jobs() -> List[Dict[str, object]]:
    """The grid cut to what a 2-core CPU runs in about two hours (two jobs at once): the default SAMI
    adapter, the β-VAE (β=1) and the β-TCVAE at 3 seeds on both datasets, and seed 0 of each SAMI
    option that no other run covers. Ordered so that a deadline cuts the least informative jobs."""
    jobs: List[Dict[str, object]] = [{"name": "pretrain-dsprites", "kind": "pretrain", "dataset": "dsprites"}]
    jobs += [job("disks", "sami", "sami-default", 0), job("disks", "sami", "sami-default-mm", 0), job("disks", "sami", "sami-cap12", 0),
             job("disks", "baseline", "bvae1", 0),
             job("disks", "sami", "sami-cap6-int", 0),
             job("disks", "baseline", "btcvae", 0), job("disks", "sami", "sami-cap6-joint", 0), job("dsprites", "sami", "sami-default", 0),
             job("dsprites", "baseline", "bvae1", 0), job("disks", "sami", "sami-cap6-blind", 0), job("disks", "sami", "sami-cap6-lora", 0)]
    for seed in (1, 2):
        jobs += [job("disks", "sami", "sami-default", seed), job("disks", "sami", "sami-cap12", seed), job("disks", "baseline", "bvae1", seed), job("disks", "baseline", "btcvae", seed),
                 job("dsprites", "sami", "sami-default", seed), job("dsprites", "baseline", "bvae1", seed)]
    jobs += [job("disks", "sami", "sami-default-int", 0)]
    jobs += [job("dsprites", "baseline", "btcvae", seed) for seed in (0, 1, 2)] + [job("disks", "sami", "sami-cap6", 0)]
    return jobs


def build_paper_jobs() -> List[Dict[str, object]]:
    """The paper-reproduction grid: 3 seeds each, the SAMI runs and the Gaussian baselines first."""
    bg = "background_disks"
    jobs: List[Dict[str, object]] = []
    for seed in (0, 1, 2):
        jobs += [job(bg, "sami", "sami-paper", seed), job(bg, "baseline", "btcvae1-gaussian", seed), job(bg, "baseline", "bvae1-gaussian", seed)]
    for seed in (0, 1, 2):
        jobs += [job(bg, "sami", "sami-frozen-paper-enc", seed), job(bg, "sami", "sami-frozen-ours", seed)]
    jobs += [job("disks", "sami", "sami-paper", seed) for seed in (0, 1, 2)] + [job(bg, "baseline", "diffae", 0)]
    jobs += [job(bg, "baseline", f"{kind}{beta}-{lik}", seed) for seed in (0, 1, 2) for kind in ("bvae", "btcvae") for beta in (1, 4)
             for lik in ("gaussian", "bernoulli") if (beta, lik) != (1, "gaussian")]
    jobs += [job(bg, "sami", key, seed) for seed in (0, 1, 2) for key in ("sami-frozen-unequal", "sami-frozen-capstart", "sami-frozen-warm", "sami-frozen-warm-bvae")]
    return jobs


def commands(job: Dict[str, object], out: str, args: argparse.Namespace) -> List[List[str]]:
    """The shell commands of one job."""
    py = sys.executable
    run_dir = os.path.join(out, "runs", str(job["name"]))
    evaluation = ["--rate_study", "--output_dir", run_dir, "--num_threads", "1", "--no_progress", "--dci_estimators", str(args.dci_estimators),
                  "--dataset", str(job["dataset"])] + args.compare_args.split()
    if job["kind"] == "pretrain":
        return [[py, "examples/pretrain_unet.py", "--dataset", "dsprites", "--output_dir", os.path.join(out, DSPRITES_BASE),
                 "--max_train_steps", str(args.pretrain_steps)]]
    if job["kind"] == "baseline":
        return [[py, "examples/compare.py", "--baselines", BASELINES[str(job["key"])], "--seeds", str(job["seed"]),
                 "--max_steps", str(args.baseline_steps), "--budget_seconds", "1e9", "--save_models"] + evaluation]
    flags = SAMI[str(job["key"])].split()
    for i, flag in enumerate(flags):
        if flag.startswith("{warm:"):  # the same seed's baseline, saved by its job's compare.py --save_models
            models = os.path.join(out, "runs", f"{job['dataset']}-{flag[6:-1]}-s{job['seed']}", "models")
            found = sorted(os.listdir(models)) if os.path.isdir(models) else []
            flags[i] = os.path.join(models, found[0]) if found else f"{models}/MISSING-run-its-baseline-job-first"
    if job["dataset"] == "dsprites":
        base = os.path.join(out, DSPRITES_BASE)
        if "--pretrained_model_name_or_path" in flags:
            flags[flags.index("--pretrained_model_name_or_path") + 1] = base
        else:
            flags += ["--pretrained_model_name_or_path", base]
        flags += ["--dataset", "dsprites"]
    elif job["dataset"] != "disks":
        flags += ["--dataset", str(job["dataset"])]
    if "--recipe" not in flags or "adapter" in flags:  # a preset's own step count stands
        flags += ["--max_train_steps", str(args.sami_steps)]
    adapter = os.path.join(out, "adapters", str(job["name"]))
    method, setting = METHOD[str(job["key"])]
    return [
        [py, "examples/finetune.py", *flags, "--seed", str(job["seed"]), "--output_dir", adapter,
         "--num_threads", "1", "--report_to", "none", "--no_report", "--validation_steps", "0", "--checkpointing_steps", "100000"],
        [py, "examples/compare.py", "--sami_adapter", adapter, "--method", method, "--setting", setting, "--baselines"] + evaluation,
    ]


def write_archive(out: str, path: str) -> None:
    """Pack runs/*/compare.json, adapters/*/logs/train_log.jsonl, logs/*.log and progress.txt (atomically)."""
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for sub, pattern in (("runs", "compare.json"), ("adapters", os.path.join("logs", "train_log.jsonl"))):
            folder = os.path.join(out, sub)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                f = os.path.join(folder, name, pattern)
                if os.path.isfile(f):
                    tar.add(f, arcname=os.path.relpath(f, out))
        for name in ("logs", "progress.txt"):
            if os.path.exists(os.path.join(out, name)):
                tar.add(os.path.join(out, name), arcname=name)
    os.replace(tmp, path)


def collect(folders: List[str], output_dir: str) -> Dict[str, object]:
    """Merge finished runs (their compare.json) into rate_study.json, rate_study.md and one metric-against-rate
    figure per dataset in ``output_dir``."""
    summaries = []
    for folder in folders:
        path = os.path.join(folder, "compare.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--collect: {path} does not exist; give folders written by compare.py --rate_study.")
        with open(path) as f:
            summaries.append(json.load(f))
    rows = rate_study_rows(summaries)
    if not rows:
        raise SystemExit("--collect: none of these runs has rate-study measurements (run compare.py with --rate_study).")
    table = rate_study_table(rows)
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "rate_study.json"), {"rows": rows, "table": table})
    for dataset in sorted({t["dataset"] for t in table}):
        plot_rate_study([t for t in table if t["dataset"] == dataset], os.path.join(output_dir, f"rate_{dataset}.png"), dataset)
    text = rate_study_markdown(table)
    with open(os.path.join(output_dir, "rate_study.md"), "w") as f:
        f.write(text)
    print(text)
    return {"rows": rows, "table": table}


def run_job(job: Dict[str, object], out: str, args: argparse.Namespace) -> bool:
    """Run one job's commands in order, its output into logs/<name>.log; False when one of them fails."""
    with open(os.path.join(out, "logs", f"{job['name']}.log"), "w") as log:
        for cmd in commands(job, out, args):
            if subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}) != 0:
                return False
    return True


def run_jobs(jobs: List[Dict[str, object]], out: str, args: argparse.Namespace) -> Dict[str, list]:
    """Run ``jobs`` ``--workers`` at a time (dsprites SAMI jobs wait for their base), skipping finished ones,
    starting none after ``--deadline_seconds``; progress.txt (and ``--archive``) after each."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    start = time.time()
    lock = threading.Lock()
    state = {"done": [], "failed": [], "queue": list(jobs)}
    base_ready = threading.Event()
    if os.path.isfile(os.path.join(out, DSPRITES_BASE, "unet", "config.json")):
        base_ready.set()
        state["queue"] = [j for j in state["queue"] if j["kind"] != "pretrain"]

    def next_job():
        with lock:
            for i, job in enumerate(state["queue"]):
                if not (job["dataset"] == "dsprites" and job["kind"] == "sami" and not base_ready.is_set()):  # else it waits for the base
                    return state["queue"].pop(i)
            return None

    def worker():
        while not (args.deadline_seconds and time.time() - start > args.deadline_seconds):
            job = next_job()
            if job is None:
                with lock:
                    if not state["queue"]:
                        return
                time.sleep(2)
                continue
            if job["kind"] != "pretrain" and os.path.isfile(os.path.join(out, "runs", str(job["name"]), "compare.json")):
                continue  # finished in an earlier sweep
            t0 = time.time()
            ok = run_job(job, out, args)
            if job["kind"] == "pretrain" and ok:
                base_ready.set()
            with lock:
                state["done" if ok else "failed"].append(f"{job['name']} ({time.time() - t0:.0f} s)")
                write_progress(out, state, time.time() - start)
                print(f"[{time.time() - start:5.0f} s] {'done' if ok else 'FAILED'} {job['name']} ({time.time() - t0:.0f} s)", flush=True)
                if args.archive:
                    write_archive(out, args.archive)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(state['done'])} done, {len(state['failed'])} failed, {len(state['queue'])} not started in {time.time() - start:.0f} s.")
    return state


def write_progress(out: str, state: Dict[str, list], elapsed: float) -> None:
    with open(os.path.join(out, "progress.txt"), "w") as f:
        f.write(f"elapsed {elapsed:.0f} s; done {len(state['done'])}, failed {len(state['failed'])}, queued {len(state['queue'])}\n")
        f.write("done: " + ", ".join(state["done"]) + "\nfailed: " + ", ".join(state["failed"]) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="sweep", help="Adapters, runs, logs and progress.txt go here (with --collect: the table).")
    p.add_argument("--workers", type=int, default=2, help="Jobs at once.")
    p.add_argument("--deadline_seconds", type=float, default=None, help="Start no job after this many seconds.")
    p.add_argument("--sami_steps", type=int, default=2500, help="finetune.py --max_train_steps of every SAMI job.")
    p.add_argument("--baseline_steps", type=int, default=10000, help="Training steps of every baseline job.")
    p.add_argument("--pretrain_steps", type=int, default=8000, help="Steps of the dsprites base UNet.")
    p.add_argument("--compare_args", default="", help="Extra flags of every compare.py call (e.g. smaller metric sizes for a quick look).")
    p.add_argument("--dci_estimators", type=int, default=50, help="DCI gradient-boosting estimators (speed).")
    p.add_argument("--grid", default="full", choices=["full", "cpu", "paper"],
                   help="full: every setting (GPU); cpu: the 2-core cut; paper: the paper-reproduction study on background_disks.")
    p.add_argument("--only", nargs="*", default=None, help="Run only jobs whose name contains one of these strings.")
    p.add_argument("--archive", default=None, help="Keep a .tar.gz of every result and log, rewritten after each finished job.")
    p.add_argument("--dry_run", action="store_true", help="Print the commands and exit.")
    p.add_argument("--collect", nargs="+", default=None, metavar="DIR",
                   help="Run nothing: merge these finished runs (runs/<name> folders) into one rate-study table and figures in --output_dir.")
    args = p.parse_args(argv)
    if args.collect:
        return collect(args.collect, args.output_dir)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    out = os.path.abspath(args.output_dir)
    grid = {"full": build_jobs, "cpu": build_cpu_jobs, "paper": build_paper_jobs}[args.grid]()
    jobs = [j for j in grid if not args.only or any(s in str(j["name"]) for s in args.only)]
    if args.dry_run:
        for job in jobs:
            for cmd in commands(job, out, args):
                print(" ".join(cmd))
        return None
    return run_jobs(jobs, out, args)


if __name__ == "__main__":
    main()
