"""``lightning-dsgd``: Lightning's command line (``LightningCLI``) with DSGD as the optimizer.

    lightning-dsgd fit --config examples/configs/digits.yaml
    lightning-dsgd fit --config examples/configs/digits.yaml --dsgd.norm linf --trainer.max_epochs 5
    lightning-dsgd fit --model my_package.MyModule --data my_package.MyData --print_config
    lightning-dsgd validate --config CONFIG --ckpt_path CKPT      # also: test, predict

* ``model`` and ``data`` are chosen by ``class_path``: any ``LightningModule`` (an ordinary
  automatic-optimization module is turned into a DSGD module; one that already mixes in
  [DSGDMixin][lightning_dsgd.DSGDMixin] keeps its settings) and any ``LightningDataModule``. The
  current directory is importable, as with ``python -m``: run from the repository root,
  ``examples.digits.DigitsMLP`` resolves.
* ``dsgd`` (optional) holds [DSGDSettings][lightning_dsgd.DSGDSettings] for the model; DSGD settings may
  come from exactly one place: this key, the model's own ``init_args.dsgd``, or the DSGD
  strategy's ``init_args.dsgd``.
* There are no ``--optimizer``/``--lr_scheduler`` options: DSGD is the optimizer, and its step
  multiplier ``η`` is scheduled with ``dsgd.eta_scheduler``.
* Strategies (``trainer.strategy``) by ``class_path`` (``lightning_dsgd.DSGDDDPStrategy``, …) or by
  registered name (``dsgd``, ``dsgd_ddp``, ``dsgd_ddp_spawn``, ``dsgd_model_parallel``); callbacks
  such as ``lightning_dsgd.DSGDMonitor`` in ``trainer.callbacks``.
* The resolved configuration is saved as ``config.yaml`` in the run's log directory (overwritten
  by a new run in the same directory).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning
import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_dsgd  # registers the strategy names and makes short class names resolvable
from lightning_dsgd.lightning.mixin import DSGDMixin, with_dsgd
from lightning_dsgd.lightning.settings import DSGDSettings

DESCRIPTION = (
    "lightning-dsgd: train a LightningModule with DSGD, duality structure gradient descent (Flynn, "
    "arXiv 1708.00523): each layer steps along its norm's duality map with its own step size η/L_i (by default "
    "every layer, with adaptive constants; --dsgd.constants=data gives the paper's algorithm, one layer per step, "
    "certified for tanh/sigmoid MLPs). Lightning's command line (LightningCLI) with DSGD as the optimizer: "
    "--dsgd.* sets the DSGD settings "
    "('lightning-dsgd fit --dsgd.help' lists them), --model and --data take any LightningModule and "
    "LightningDataModule. Example: lightning-dsgd fit --config examples/configs/digits.yaml"
)


def version_text() -> str:
    """What ``lightning-dsgd --version`` prints: this package's version and Lightning's and torch's."""
    return f"lightning-dsgd {lightning_dsgd.__version__} (lightning {lightning.__version__}, torch {torch.__version__})"


class DSGDLightningCLI(LightningCLI):
    """``LightningCLI`` whose model is trained by DSGD (see the module docstring)."""

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Lightning's parsers, introduced as DSGD's, with ``--version``."""
        super().setup_parser(
            add_subcommands, {"prog": "lightning-dsgd", "description": DESCRIPTION, **main_kwargs}, subparser_kwargs
        )
        self.parser.add_argument("--version", action="version", version=version_text())

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--dsgd",
            type=DSGDSettings | None,
            default=None,
            help=(
                "DSGD settings of the model (lightning_dsgd.DSGDSettings), e.g. --dsgd.norm linf. "
                "Unset: the model's own settings (DSGDMixin) or the defaults."
            ),
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        sources = [
            name
            for name, value in (
                ("dsgd", config.get("dsgd")),
                ("model.init_args.dsgd", _get(config, "model.init_args.dsgd")),
                ("trainer.strategy.init_args.dsgd", _get(config, "trainer.strategy.init_args.dsgd")),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(
                f"DSGD settings are given in {len(sources)} places ({', '.join(sources)}): keep exactly one, "
                "so that it is clear which one trains the model."
            )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        settings = self._get(self.config_init, "dsgd")
        if settings is not None or not isinstance(self.model, DSGDMixin):
            with_dsgd(self.model, settings)


def _get(config: Any, dotted: str) -> Any:
    """``config.a.b.c`` or ``None`` where any part is missing (jsonargparse Namespaces and dicts)."""
    value = config
    for key in dotted.split("."):
        if value is None:
            return None
        try:
            value = value[key] if isinstance(value, dict) else getattr(value, key)
        except (AttributeError, KeyError):
            return None
    return value


def cli(args: ArgsType = None, run: bool = True) -> DSGDLightningCLI:
    """Build (and with ``run``, execute) the command line: ``args`` as on the command line, or
    ``None`` for ``sys.argv``. Returns the ``LightningCLI`` object (``.trainer``, ``.model``, …)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts do not put the cwd on the path
        sys.path.insert(0, cwd)
    return DSGDLightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """The ``lightning-dsgd`` command. A multi-process run leaves its process group behind; it is
    destroyed before exit, else gloo's threads can abort the interpreter at shutdown."""
    try:
        cli(args)
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy the default process group if one is initialised (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
