"""Primus MAE encoder step: token-sparse (visible tokens only) vs the same Primus run densely, side by side.

One step = encoder forward + backward (sum of the features as the loss) of a batch of Primus tokens:

- dense: the EVA over all N tokens of the patch (the masked ones replaced by the mask token, as a dense
  masked-image model runs it);
- sparse: the EVA over the K = N - round(N * ratio) visible tokens only, with their own position
  embeddings (:class:`s3d.sparse.PrimusMAEWrapper`'s encoder).

Both rows run in the same process on the same weights and inputs, alternating, and the table gives the
ratio dense / sparse per mask ratio, in wall time and in process CPU time (on a shared CPU machine the
CPU time is less distorted by other jobs) (attention is quadratic in the tokens, the MLP linear, so the ideal
speed-up lies between 1 / (1 - ratio) and its square).

Run::

    PYTHONPATH=$PWD python benchmarks/primus_sparse.py --threads 1          # CPU-sized default: primus_s, 64^3
    PYTHONPATH=$PWD python benchmarks/primus_sparse.py --arch primus_m --patch 160 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _step(fn, device: torch.device) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="primus_s")
    p.add_argument("--patch", type=int, default=64, help="cubic patch edge, voxels (default 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import s3d
    from s3d.sparse import PrimusMAEWrapper, sample_token_keep

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = s3d.build_primus(args.arch, in_channels=1, num_classes=1, input_shape=args.patch).to(device)
    mae = PrimusMAEWrapper(net).to(device)
    cfg = net.config
    x = torch.randn(args.batch, 1, *cfg.input_shape, device=device)
    print(f"# {args.arch} (embed {cfg.embed_dim}, depth {cfg.eva_depth}), patch {cfg.input_shape}, "
          f"{cfg.num_tokens} tokens, batch {args.batch}, {device}, {torch.get_num_threads()} thread(s); "
          f"median of {args.repeats} steps (encoder forward + backward)")
    print("| mask ratio | visible tokens | dense wall s | sparse wall s | dense/sparse wall | dense CPU s | "
          "sparse CPU s | dense/sparse CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        keep_index = sample_token_keep(args.batch, cfg.num_tokens, ratio, torch.Generator().manual_seed(1), device)
        tokens = net.embed(x).detach()

        def dense(tokens: torch.Tensor = tokens, keep_index: torch.Tensor = keep_index) -> None:
            grid = mae.keep_grid(keep_index).view(args.batch, -1, 1)
            t = torch.where(grid, tokens, mae.mask_token.to(tokens.dtype))
            net.eva(t).sum().backward()

        def sparse(tokens: torch.Tensor = tokens, keep_index: torch.Tensor = keep_index) -> None:
            mae.encode(tokens, keep_index).sum().backward()

        dense(), sparse()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {"dense": [], "sparse": []}
        for _ in range(args.repeats):
            times["dense"].append(_step(dense, device))
            times["sparse"].append(_step(sparse, device))
        dw, sw = (statistics.median(t[0] for t in times[k]) for k in ("dense", "sparse"))
        dc, sc = (statistics.median(t[1] for t in times[k]) for k in ("dense", "sparse"))
        print(f"| {ratio:.2f} | {keep_index.shape[1]} / {cfg.num_tokens} | {dw:.3f} | {sw:.3f} | {dw / sw:.2f}x | "
              f"{dc:.3f} | {sc:.3f} | {dc / sc:.2f}x |")


if __name__ == "__main__":
    main()
