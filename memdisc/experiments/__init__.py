"""Experiments: grids of runs over named axes and seeds, resumable, with one result schema.

* ``grid.py``: :class:`Grid` (axes x seeds -> :class:`Cell`, each with a stable id and its own directory);
* ``runner.py``: :func:`run_grid` (every cell through a cell function, resumable, failed cells retried
  then reported by id) and the executor seam (:func:`sequential`); ``executors.py`` the other executors
  (local worker processes, Ray) and ``ExecutorConfig``, the grid commands' ``--executor`` options;
* ``results.py``: the one result schema, :class:`CellResult` (a cell's typed payload in an envelope),
  :class:`CellFailure` and :class:`GridResults` (the file of a whole grid);
* ``compare.py``: ``memdisc compare`` as a preset of the grid; ``summary.py`` its summary over seeds;
  ``report.py`` its Markdown table and figures;
* ``study.py``: ``memdisc study``, the poisoning study (attack x training setting x poison fraction
  x seeds: ``StudyConfig``, ``StudyGrid``, ``StudyRun``, ``run_study``); ``study_result.py`` its cell's
  result (``StudyResult``); ``study_report.py`` its table, accuracy-vs-fraction curves, sample grid
  and saliency figure.
"""
from memdisc.experiments.grid import Cell, Grid
from memdisc.experiments.results import PAYLOADS, CellFailure, CellResult, GridResults
from memdisc.experiments.runner import Executor, GridError, run_grid, sequential

__all__ = ["Cell", "CellFailure", "CellResult", "Executor", "Grid", "GridError", "GridResults", "PAYLOADS",
           "run_grid", "sequential"]
