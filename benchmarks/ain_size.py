"""What the AIN's size rule picks: for each SFRN and image size, the reference AIN's share of the SFRN's
forward FLOPs and the AIN ``model.ain_budget`` sizes it to (torch's FLOP counter, on the CPU).

    python -m benchmarks.ain_size --budget 0.05 --out docs/results/ain_size.json
"""
from __future__ import annotations

import argparse

from benchmarks.common import write_result
from mcci_models import create_sfrn, fit_ain
from mcci_models.ain import AttackIndicationNetwork
from mcci_models.flops import forward_flops

CASES = (("tf_efficientnet_lite0", 128), ("tf_efficientnet_lite0", 160), ("tf_efficientnet_lite0", 224),
         ("vit_small_patch16_224", 224), ("vit_base_patch16_224", 224), ("mcci_convnet_small", 32),
         ("preact_resnet18", 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for sfrn, size in CASES:
        sfrn_flops = forward_flops(create_sfrn(sfrn, 100, size), (1, 3, size, size))
        reference = forward_flops(AttackIndicationNetwork(size), (1, 3, size, size))
        widths, stride, line = fit_ain(args.budget, sfrn, size, 100, (32, 64, 128), (0.2, 0.3, 0.4))
        sized = forward_flops(AttackIndicationNetwork(size, 3, 100, widths, (0.2, 0.3, 0.4), stride), (1, 3, size, size))
        rows.append({"sfrn": sfrn, "image_size": size, "sfrn_gflops": sfrn_flops / 1e9,
                     "reference_ain_share": reference / sfrn_flops, "sized_widths": list(widths),
                     "sized_stem_stride": stride, "sized_ain_share": sized / sfrn_flops})
        print(f"{sfrn} @ {size}: reference AIN {reference / sfrn_flops:.1%}; {line}")
    write_result("ain_size", {"budget": args.budget, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
