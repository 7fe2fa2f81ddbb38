"""ROSA's SVD on a CUDA GPU: accuracy and seconds of each cuSOLVER driver, and of ``rosa.subspace.thin_svd``.

Float32 batches of ``--batch`` matrices with known singular values (W = Q1 diag(s) Q2^T, Q1 and Q2
orthonormal, built in float64): a linear spectrum from 1 to 0.1, ``1/i`` (condition number k), ``1/i^2``
(k^2: ill-conditioned in float32) and rank 8 (exact zeros). Error = the largest of the
orthogonality errors of U and Vh and the relative reconstruction error (``subspace.svd_error``);
"s error" = max |s - s_true| / s_true[0]. Then one whole-model ``rosa.resample`` of a model from
``rosa bench``'s random configs, with ``thin_svd`` and with torch's default driver.

    python benchmarks/gpu_svd.py --out benchmarks/results   # writes svd_gpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import rosa
from rosa import subspace
from rosa.experiments import bench
from rosa.experiments.reporting import format_table, machine_info, write_json, write_markdown

SPECTRA = ("linear 1 to 0.1", "1/i", "1/i^2", "rank 8")
METHODS = {  # name -> thin SVD of a float32 CUDA batch
    "torch default (gesvdj)": lambda w: torch.linalg.svd(w, full_matrices=False),
    "gesvda": lambda w: torch.linalg.svd(w, full_matrices=False, driver="gesvda"),
    "gesvd": lambda w: torch.linalg.svd(w, full_matrices=False, driver="gesvd"),
    "rosa thin_svd": subspace.thin_svd,
}


def spectrum(name: str, k: int) -> torch.Tensor:
    """Singular values ``[k]`` (float64, descending)."""
    i = torch.arange(1, k + 1, dtype=torch.float64)
    if name == "linear 1 to 0.1":
        return torch.linspace(1, 0.1, k, dtype=torch.float64)
    if name == "rank 8":
        return torch.where(i <= 8, 1 / i, 0.0)
    return 1 / i if name == "1/i" else 1 / i**2


def matrices(name: str, batch: int, out: int, inp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [batch, out, in]`` float32 with singular values ``s [k]`` (float64, CPU)."""
    k = min(out, inp)
    s = spectrum(name, k)
    q1 = torch.linalg.qr(torch.randn(batch, out, k, dtype=torch.float64, device=device)).Q  # [B, out, k]
    q2 = torch.linalg.qr(torch.randn(batch, inp, k, dtype=torch.float64, device=device)).Q  # [B, in, k]
    return ((q1 * s.to(device)) @ q2.mT).float(), s


def accuracy_rows(shapes: list[tuple[int, int]], batch: int, device: torch.device) -> list[dict]:
    rows = []
    for out, inp in shapes:
        for name in SPECTRA:
            w, s_true = matrices(name, batch, out, inp, device)
            for method, fn in METHODS.items():
                row = {"shape": f"{batch} x {out} x {inp}", "spectrum": name, "method": method}
                factors = []
                try:
                    fn(w[:1])  # warm-up: cuSOLVER handles and workspaces
                    row["seconds"] = bench.timed(lambda: factors.extend(fn(w)), device)
                except torch.linalg.LinAlgError:  # gesvda gives up on some rank-deficient batches
                    row |= {"seconds": None, "error": "raised LinAlgError"}
                else:
                    u, s, vh = factors
                    row["error"] = subspace.svd_error(w.double(), u.double(), s.double(), vh.double()).max().item()
                    row["s error"] = ((s.double().cpu() - s_true).abs().max() / s_true[0]).item()
                rows.append(row)
                print(row, flush=True)
    return rows


def resample_rows(model_name: str, reps: int, device: torch.device) -> list[dict]:
    kind = bench.parse_model(model_name)[1]
    model = rosa.wrap(bench.load_model(model_name, kind, torch.bfloat16, device),
                      rosa.RosaConfig(rank=8, factor_dtype="float32"))
    layers = len(rosa.rosa_layers(model))
    library = subspace.thin_svd
    rows = []
    for method, fn in (("rosa thin_svd", library), ("torch default (gesvdj)", METHODS["torch default (gesvdj)"])):
        subspace.thin_svd = fn
        try:
            times = [bench.timed(lambda: rosa.resample(model), device) for _ in range(reps)]
        finally:
            subspace.thin_svd = library
        rows.append({"model": model_name, "layers": layers, "method": method, "median seconds": statistics.median(times),
                     "min seconds": min(times)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="llama-1b", help="a rosa bench random config for the resample timing")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_svd.py needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    machine = machine_info()
    accuracy = accuracy_rows([(2048, 2048), (512, 2048)], args.batch, device)
    resample = resample_rows(args.model, args.reps, device)
    result = {"settings": vars(args), "machine": machine, "accuracy": accuracy, "resample": resample}
    out = Path(args.out)
    write_json(out / "svd_gpu.json", result)
    body = "\n\n".join([
        f"Float32 batches, known singular values; error = max of U and Vh orthogonality errors and relative "
        f"reconstruction error; `rosa thin_svd` = gesvda, with any matrix whose error exceeds "
        f"{subspace.SVD_TOLERANCE:g} redone by gesvd.",
        format_table(accuracy, ["shape", "spectrum", "method", "seconds", "error", "s error"], ".3g"),
        f"One whole-model `rosa.resample` ({args.reps} repetitions, bf16 weights, rank 8):",
        format_table(resample, ["model", "layers", "method", "median seconds", "min seconds"], ".3g"),
    ])
    write_markdown(out / "svd_gpu.md", "ROSA's SVD on a CUDA GPU", body, machine)
    print(body)


if __name__ == "__main__":
    main()
