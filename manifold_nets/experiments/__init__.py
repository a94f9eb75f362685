"""The paper's experiments, on top of the library: data, the protocol of Section 4, the
Table 2 grid on two engines, reports, SegNet, benchmarks and the command line.

The library (:mod:`manifold_nets`) never imports this package; every module here may
import the library.

=================  ===================================================================
module             what
=================  ===================================================================
``data``           MNIST and Fashion-MNIST: find, download with checksums, read IDX
``config``         the run configuration, schedules, stopping and divergence, the split
``loop``           the one epoch loop for ``R`` runs, and the one-module engine
``stacked``        ``StackedNet``: ``R`` paper nets as one stacked model (the other engine)
``engines``        the protocol on both engines: ``train``, ``train_group``, selection
``grid``           the Table 2 grid: run specs, shards, workers
``store``          the resumable results store, one record per finished run
``report``         Table 2 beside the paper, Welch comparisons, trajectories
``checkpoint``     checkpoints that resume exactly and refuse what does not fit
``io``             the atomic writer and the checks before work
``progress``       progress bars: tqdm where installed, else silent ones
``metrics``        the SegNet paper's segmentation metrics
``camvid``         SegNet-Basic on CamVid (the paper's Section 6)
``zoo``            reference models: ResNet-18, a pre-LN transformer, a residual MLP
``bench``          timings against ``torch.optim.SGD`` and geoopt
``demo``           the tour of ``make demo``
``cli``            the ``manifold-nets`` command line
=================  ===================================================================
"""
