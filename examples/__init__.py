"""DSGD examples: scripts, and the LightningModules / DataModules their configs name by class path.

Not part of the installed package: run from the repository root, so that ``examples.digits.DigitsMLP``
(and the others) import, e.g. ``lightning-dsgd fit --config examples/configs/digits.yaml``.
"""
