"""Every file format of the pipeline, each with its reader and writer, side by side.

- :mod:`rcdm.formats.hdf5`: images files (uint8 crops, labels, paths, factors) and features files
  ([N, 2, D] representations of each image and its mirror), sharded ``X.part-i-of-k.h5`` and merged;
- :mod:`rcdm.formats.samples`: samples shards written by ``rcdm sample``;
- :mod:`rcdm.formats.npz`: the merged samples ``.npz`` in the ADM evaluation format;
- :mod:`rcdm.formats.metrics_csv`: ``metrics.csv`` rows written by ``rcdm evaluate``, read by
  ``rcdm tabulate``.
"""
