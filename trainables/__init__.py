"""Training: backbones, survival heads and losses, the fold trainer and the fold models it leaves.

Import from the modules themselves (``from trainables.fold import FoldTrainer``): the package
re-exports nothing, so that importing one light module of it (or a command's ``--help``) does not
load torch and MONAI, and go-to-definition lands on the definition.
"""
