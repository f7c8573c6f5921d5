"""LightningCLI entry point for the demo model; the YAML recipes in configs/ run through it.

    python examples/cli.py fit --config configs/periodic.yaml
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402


def main(args=None) -> LightningCLI:
    return LightningCLI(DemoModel, DemoDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
