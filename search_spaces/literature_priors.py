"""``literature_priors``: ranges centred on the reference recipe, from published 3D CNN work.

The reference recipe (the first configuration evaluated in every cell): AdamW-style training with
lr 1e-4, weight decay 1e-6, batch 64, 200 epochs, 10 folds.

Ranges and their sources:

- learning rate 1e-5 to 1e-3 (log): 3D medical CNNs trained with Adam/AdamW use 1e-5..1e-3
  (Chen, Ma & Zheng, "Med3D", arXiv:1904.00625, 2019: 1e-3 SGD / 1e-4 Adam fine-tuning;
  Hara, Kataoka & Satoh, CVPR 2018, 3D ResNets: 1e-3 to 1e-4), and the SE-ResNeXt glioma
  survival recipe used 1e-4.
- weight decay 1e-7 to 1e-3 (log): AdamW decoupled decay (Loshchilov & Hutter, ICLR 2019)
  from negligible up to 1e-3, covering the recipe's 1e-6.
- batch size 16/32/64: 3D volumes of 120 x 120 x 78 fit 16-64 per GPU; the recipe's 64 is the
  upper end; smaller batches are common in 3D survival work (Cox risk sets, see the Cox head).
- dropout 0 to 0.5 before the output layer (Hu et al., SE-Nets, CVPR 2018 used 0.2 in
  SE-ResNeXt; 0.5 in classic CNN heads).
- augmentation strength 0 to 1.5 (flips, small rotations/scalings, intensity jitter).
- optimizer AdamW (recipe) or SGD with Nesterov momentum (Hara et al. 2018).

Inputs: the full protocol trains every backbone on images alone and on images with the
clinical vector (`trainables.fusion`; the reference group's next step), the fusion's clinical
branch linear (the reference) or with a hidden layer of 32 and dropout up to 0.5; the demo
trains images alone (``--inputs image image+clinical`` adds the fusion cells): the reference recipe
alone in every cell but one, DenseNet-121 on overall survival of all patients, where the search
tries 8 configurations (the reference first) under ASHA (rungs at 4 and 8 epochs, halving), so
that the demo shows a search choosing among finished configurations, and the results table
compares the choice with the reference recipe, in under 10 minutes on two cores without AVX-512.

Full protocol: the reference study's 10 folds and 200 epochs, the logistic-hazard head on its own
discretisation for OS (19 intervals, breaks exponentially spaced with a half-life of 730 days, to
about 3,155 days), and the epoch chosen on 15% of each training fold with early stopping after
40 epochs without improvement (about 135 patients per selection split at 1,000 patients).

Demo protocol (CPU, the built-in 150-patient cohort at 32 x 32 x 24): networks at width 0.25 and
depth 0.2, 3 folds, 14 epochs (the reference recipe's pooled C on OS of all patients, 3 folds, seed
0, on an AVX2 CPU: DenseNet-121 0.672 at 14 epochs and 0.659 at 20; ResNet50-CBAM 0.659 and
SE-ResNeXt50 0.635 at 14, 0.649 and 0.637 in the 20-epoch demo), the predictions of the last epoch (a selection split of 15
patients chooses by noise, `benchmarks/results/learning.md`), batches of 8-16 and a learning rate
of 3e-3 to 2e-2 with AdamW, 1e-2 for the reference (measured on the demo cohort, 3 seeds, 20 epochs: ResNet50-CBAM
reached a pooled C of 0.632 at 3e-3 and 0.669 at 1e-2, SE-ResNeXt50 0.580 and 0.614, DenseNet-121
0.644 and 0.641; at 1e-4 these small networks learn nothing visible in 20 epochs), and stronger
augmentation, 1.5 for the reference: with 1.0 SE-ResNeXt50 reached 0.592 on the demo's 1-year
task and 0.635 with 1.5, while the OS cells of ResNet50-CBAM and DenseNet-121 went from 0.685 and
0.696 to about 0.66 and 0.67 (one seed, one thread, as the demo trains).
"""

from datasets.clinical_features import IMAGE, IMAGE_CLINICAL
from search_spaces._space import Choice, LogUniform, Protocol, SearchSpace, Uniform

SPACE = SearchSpace(
    name="literature_priors",
    summary="ranges from 3D CNN literature around the reference recipe (full budget: lr 1e-4, wd 1e-6, batch 64, "
            "200 epochs, 10 folds)",
    distributions={
        "lr": LogUniform(1e-5, 1e-3),
        "weight_decay": LogUniform(1e-7, 1e-3),
        "batch_size": Choice((16, 32, 64)),
        "dropout": Uniform(0.0, 0.5),
        "augmentation": Uniform(0.0, 1.5),
        "optimizer": Choice(("adamw", "sgd")),
    },
    reference={"lr": 1e-4, "weight_decay": 1e-6, "batch_size": 64, "dropout": 0.0, "augmentation": 1.0,
               "optimizer": "adamw"},
    protocols={
        "full": Protocol(folds=10, epochs=200, num_samples=20, grace_epochs=20, reduction_factor=3,
                         os_head="logistic_hazard",
                         fixed={"warmup_epochs": 5, "patience": 40, "selection_fraction": 0.15,
                                "cut_spacing": "exponential", "intervals": 19},
                         checkpoint_every=5, inputs=(IMAGE, IMAGE_CLINICAL),
                         distributions={"clinical_hidden": Choice((0, 32)), "clinical_dropout": Uniform(0.0, 0.5)},
                         reference={"clinical_hidden": 0, "clinical_dropout": 0.0}),
        # CPU-sized: scaled networks on the 32 x 32 x 24 demo cohort (about 100 training patients per
        # fold), so smaller batches and a higher learning rate; the rest of the recipe is unchanged.
        "demo": Protocol(folds=3, epochs=14, num_samples=1, cell_samples={"densenet121/os_all": 6}, grace_epochs=7,
                         reduction_factor=2, width=0.25, depth=0.2, os_head="cox", fixed={"warmup_epochs": 1},
                         distributions={"lr": LogUniform(3e-3, 2e-2), "batch_size": Choice((8, 16)),
                                        "dropout": Uniform(0.0, 0.3), "augmentation": Uniform(1.0, 2.0),
                                        "optimizer": Choice(("adamw",))},
                         reference={"lr": 1e-2, "batch_size": 16, "augmentation": 1.5}, checkpoint_every=5),
    },
)
