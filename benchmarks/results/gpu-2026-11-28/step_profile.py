"""Second device check: (A) accuracy and speed of CUDA SVD drivers against a float64 reference;
(B) why adapter train steps are slower than full fine-tuning on a GPU: per-method step times
(ROSA fp32 / bf16 factors, LoRA, full) and the top CUDA kernels of a ROSA and a full step."""
import statistics, sys, time
import torch
from rosa.experiments import bench

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
name = sys.argv[2] if len(sys.argv) > 2 else "llama-1b"
sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
p = lambda *a: print(*a, flush=True)  # noqa: E731

def section_svd():
    torch.manual_seed(0)
    for out, inp in [(2048, 2048), (512, 2048)]:
        k = min(out, inp)
        for spectrum in ("gaussian", "decay 1/i"):
            if spectrum == "gaussian":
                w = torch.randn(4, out, inp, dtype=torch.float64, device=dev)
                ref = torch.linalg.svdvals(w).cpu()
            else:  # known singular values 1/i: W = Q1 diag(s) Q2^T with orthonormal Q1, Q2
                ref = (1.0 / torch.arange(1, k + 1, dtype=torch.float64)).expand(4, k)
                q1 = torch.linalg.qr(torch.randn(4, out, k, dtype=torch.float64, device=dev)).Q
                q2 = torch.linalg.qr(torch.randn(4, inp, k, dtype=torch.float64, device=dev)).Q
                w = (q1 * ref[:, None, :].to(dev)) @ q2.mT
            w32 = w.float()
            w = w.cpu()
            for driver in ((None, "gesvdj", "gesvda") if dev.type == "cuda" else (None,)):
                try:
                    sync(); t = time.perf_counter()
                    u, s, vh = torch.linalg.svd(w32, full_matrices=False, driver=driver)
                    sync(); t = time.perf_counter() - t
                except Exception as e:  # noqa: BLE001
                    p(out, inp, spectrum, driver, "error", type(e).__name__, e); continue
                u, s, vh = u.double().cpu(), s.double().cpu(), vh.double().cpu()
                eye = torch.eye(k, dtype=torch.float64)
                p(f"{out}x{inp} {spectrum:9s} {str(driver):6s} {t:7.3f}s  s err/s0 {((s - ref).abs().max() / ref[:, :1].max()).item():.1e}"
                  f"  s err rel(min) {((s[:, -1] - ref[:, -1]).abs() / ref[:, -1]).max().item():.1e}"
                  f"  |UtU-I| {(u.mT @ u - eye).abs().max().item():.1e}  |VVt-I| {(vh @ vh.mT - eye).abs().max().item():.1e}"
                  f"  recon {((u * s[:, None, :]) @ vh - w).norm().item() / w.norm().item():.1e}")

def section_gemm():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, 2048, device=dev, dtype=dtype); g = torch.randn(4096, 8, device=dev, dtype=dtype)
        for label, fn in (("x@downT [4096,2048]x[2048,8]", lambda: x @ x.new_ones(2048, 8)),
                          ("g^T@x [8,4096]x[4096,2048] (grad down)", lambda: g.mT @ x),
                          ("x@W [4096,2048]x[2048,2048]", lambda: x @ x.new_ones(2048, 2048))):
            fn(); sync(); t = time.perf_counter()
            for _ in range(20): fn()
            sync(); p(f"{dtype} {label}: {(time.perf_counter() - t) / 20 * 1e6:.0f} us")

def section_steps():
    s = bench.BenchSettings(models=[name], dtype="bfloat16", factor_dtype="float32", device=str(dev))
    kind = bench.parse_model(name)[1]
    original = bench.load_model(name, kind, torch.bfloat16, dev).eval()
    batch = bench.make_batch(original, kind, 8, 512 if dev.type == "cuda" else 16, dev)
    import copy, dataclasses
    runs = {}
    for label, method, fdt in (("rosa-f32", "rosa", "float32"), ("rosa-bf16", "rosa", "bfloat16"), ("lora", "lora", None), ("full", "full", None)):
        t = time.perf_counter()
        runs[label] = bench.prepare(copy.deepcopy(original), method, dataclasses.replace(s, factor_dtype=fdt))
        p(label, "prepared in", round(time.perf_counter() - t, 2), "s")
    times = bench.alternating_times({m: (lambda m=m: bench.train_step(*runs[m], batch)) for m in runs}, 10, 3, dev, "steps")
    for m, ts in times.items():
        p(f"{m}: median {statistics.median(ts) * 1e3:.1f} ms, min {min(ts) * 1e3:.1f} ms")
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for m in ("rosa-f32", "full"):
        with profile(activities=acts) as prof:
            for _ in range(2): bench.train_step(*runs[m], batch)
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        p(f"--- {m}, 2 steps, by {key}")
        p(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))

for f in (section_svd, section_gemm, section_steps):
    t = time.perf_counter(); f(); p(f"=== {f.__name__} {time.perf_counter() - t:.1f}s")

def section_resample_drivers():
    """One whole-model resample of ROSA on the model, with torch's default CUDA SVD and with gesvda."""
    import rosa
    from rosa import subspace
    kind = bench.parse_model(name)[1]
    model = bench.load_model(name, kind, torch.bfloat16, dev)
    batch = bench.make_batch(model, kind, 2, 64, dev)
    model = rosa.wrap(model, rosa.RosaConfig(rank=8, factor_dtype="float32"))
    with torch.no_grad():
        before = model(**batch).loss.item()
    original = subspace.svd
    for driver in (None, "gesvda"):
        def patched(weight, driver=driver):
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False, driver=driver)
            u, vh = subspace.canonical_signs(u, vh)
            return u, s, vh
        subspace.svd = patched if dev.type == "cuda" else original
        sync(); t = time.perf_counter(); rosa.resample(model); sync(); t = time.perf_counter() - t
        with torch.no_grad():
            after = model(**batch).loss.item()
        p(f"resample driver={driver}: {t:.2f}s, loss before {before:.5f} after {after:.5f}")
    subspace.svd = original

t = time.perf_counter(); section_resample_drivers(); p(f"=== section_resample_drivers {time.perf_counter() - t:.1f}s")
