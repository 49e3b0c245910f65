"""Do the attention kernels keep packed sequences apart here? Then a DeepSpeed smoke test.

For each kernel, a tiny RewardModel scores packed rows (many short sequences in one row, a
sequence that fills a row exactly) and each sequence alone; the largest difference is
reported against the spread of the rewards, and one backward pass must give finite
gradients. A control packs the same rows with positions that do not restart, which must
fail the check (it proves the check can fail). Then a DeepSpeed engine (NCCL on a GPU,
gloo on a CPU, world size 1) trains the tiny model for a few packed steps.

    python benchmarks/packed_kernels.py [--kernels sdpa,flex_attention,polar_varlen] [--json f]

Exit status 1 when a kernel gives wrong rewards or the smoke test fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_scaling.losses import bradley_terry_loss, pair_scores  # noqa: E402
from polar_scaling.packed_attention import packed_inputs, use_attention  # noqa: E402
from polar_scaling.packing import PackedBatch, pack_sequences  # noqa: E402
from polar_scaling.sizes import get_size, hf_config  # noqa: E402

VOCAB, ROW, PAD_ID = 512, 256, 0
LENGTHS = [256, 3, 1, 40, 7, 120, 5, 9, 2, 60, 17, 33, 200, 11, 1, 4]


def tiny_model(device, dtype, head_std: float | None = None):
    from polar_scaling.model import RewardModel

    torch.manual_seed(0)
    size = get_size("t800k").with_vocab(VOCAB)
    with torch.device(device):
        model = RewardModel.from_config(hf_config(size, pad_token_id=PAD_ID))
    if head_std is not None:
        torch.nn.init.normal_(model.score.weight, std=head_std)
    return model.to(dtype)


def sequences(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def reference_rewards(model, seqs, device):
    use_attention(model, "sdpa")
    return torch.cat([model(torch.tensor([s], device=device)) for s in seqs])


def check_kernel(model, batch, ref, impl, tolerance) -> dict:
    use_attention(model, impl)
    t0 = time.perf_counter()
    out = model(**packed_inputs(batch, impl))
    diff = (out.detach() - ref).abs().max().item()
    out.square().sum().backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters()
                       if p.grad is not None)
    model.zero_grad(set_to_none=True)
    spread = ref.std().item()
    ok = diff <= tolerance * spread and grads_finite
    return {"max_abs_diff": diff, "reward_std": spread, "relative": diff / spread,
            "grads_finite": grads_finite, "seconds": time.perf_counter() - t0, "ok": ok}


def check_kernels(kernels, device, dtype) -> dict:
    # A larger head than the default makes reward differences visible above bf16 rounding.
    model = tiny_model(device, dtype, head_std=0.5)
    seqs = sequences()
    batch = pack_sequences(seqs, ROW, PAD_ID).to(device)
    ref = reference_rewards(model, seqs, device)
    # bf16 rounds differently in packed and single-sequence shapes; fp32 must agree closely.
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    results = {}
    for impl in kernels:
        try:
            results[impl] = check_kernel(model, batch, ref, impl, tolerance)
        except Exception as e:  # a kernel missing here is a finding, not a crash
            results[impl] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            traceback.print_exc()
    # Control: positions that run on across sequences merge them, so rewards must change.
    leaky = PackedBatch(batch.input_ids, torch.arange(ROW, device=device).expand_as(
        batch.input_ids).contiguous(), batch.score_index, batch.seq_lens)
    control = check_kernel(model, leaky, ref, "sdpa", tolerance)
    results["control_no_restart"] = {**control, "ok": not control["ok"]}
    return results


def smoke(device, zero_stage: int, steps: int = 3) -> dict:
    """Train the tiny model for a few packed steps through polar_scaling.engine.Engine."""
    import torch.distributed as dist

    from polar_scaling.dist_env import init_distributed
    from polar_scaling.engine import Engine, EngineArgs, OptimArgs
    from polar_scaling.packed_attention import best_packed_attention

    init_distributed()
    model = tiny_model(device, torch.float32)
    impl = best_packed_attention(device)
    use_attention(model, impl)
    precision = "bf16" if device.type == "cuda" else "fp32"
    engine = Engine(model, EngineArgs(zero_stage=zero_stage, precision=precision),
                    OptimArgs(lr=1e-4, warmup_ratio=0.0), total_steps=steps, micro_batch=1,
                    grad_accum=1, run_path=None)
    seqs = sequences(seed=2)
    half = len(seqs) // 2
    batch = pack_sequences(seqs[:half] + seqs[half:2 * half], ROW, PAD_ID).to(engine.device)

    def loss_fn(module, b):
        chosen, rejected = pair_scores(module(**packed_inputs(b, impl)))
        return bradley_terry_loss(chosen, rejected), {}

    losses = [engine.train_step([batch], loss_fn)[0] for _ in range(steps)]
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    return {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "precision": precision, "param_dtypes": dtypes, "attention": impl,
            "zero_stage": zero_stage, "losses": losses,
            "ok": all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default=None,
                   help="comma-separated (default: sdpa,eager,polar_varlen, plus "
                        "flex_attention on a GPU)")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--no-smoke", dest="smoke", action="store_false")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.kernels:
        kernels = args.kernels.split(",")
    else:
        kernels = ["sdpa", "eager", "polar_varlen"]
        if device.type == "cuda":
            kernels.append("flex_attention")
        else:
            print("CPU: flex_attention not checked (it compiles through a C++ toolchain, "
                  "about 30 s here); pass --kernels to include it", flush=True)
    result = {"device": str(device), "torch": torch.__version__}
    # bf16 on a GPU (the training precision; torch's varlen kernel takes half precision
    # only, and each dtype costs flex attention another compile), fp32 on a CPU.
    for dtype in ([torch.bfloat16] if device.type == "cuda" else [torch.float32]):
        result[str(dtype)] = check_kernels(kernels, device, dtype)
        for impl, r in result[str(dtype)].items():
            status = "PASS" if r["ok"] else "FAIL"
            detail = r.get("error") or (f"max|diff| {r['max_abs_diff']:.3g} = "
                                        f"{r['relative']:.3g} x reward std")
            print(f"{str(dtype):>14} {impl:>20}: {status}  {detail}", flush=True)
    ok = all(r["ok"] for k, v in result.items() if isinstance(v, dict) for r in v.values())
    if args.smoke:
        try:
            result["smoke"] = smoke(device, args.zero)
        except Exception as e:
            traceback.print_exc()
            result["smoke"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        print(f"DeepSpeed smoke: {'PASS' if result['smoke']['ok'] else 'FAIL'} "
              f"{json.dumps(result['smoke'], default=str)}", flush=True)
        ok = ok and result["smoke"]["ok"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
