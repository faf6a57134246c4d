"""Predict many scans: find inputs, shard them across jobs, skip finished ones, overlap I/O.

``plan_cohort`` names and checks every output before any model loads (``outputs``) and
``jobs_to_do`` decides, under the outputs' locks, which cases remain (``finished``: ``--continue``,
``--overwrite``); ``predict_cases`` segments them with overlapped reading and writing
(``pipeline``). ``medseg3d predict`` and ``evaluate --model`` both use them; the cases come from a
file or folder (``inputs``) or, for ``evaluate --model``, from a dataset's test cases.
"""

from medseg3d.cohort.finished import jobs_to_do, unfinished
from medseg3d.cohort.inputs import (
    InputCase,
    SkippedInput,
    check_channels,
    find_inputs,
    is_scan,
    list_inputs,
    shard,
    single_scan,
)
from medseg3d.cohort.outputs import (
    OUTPUT_SUFFIXES,
    SEG_SUFFIX,
    CohortPlan,
    check_output_entry,
    check_writable,
    output_suffix,
    plan_cases,
    plan_cohort,
    plan_outputs,
    probabilities_path,
    written_paths,
)
from medseg3d.cohort.pipeline import (
    BackgroundWriter,
    about_case,
    predict_cases,
    read_cases,
    read_input,
    write_prediction,
)

__all__ = ["OUTPUT_SUFFIXES", "SEG_SUFFIX", "BackgroundWriter", "CohortPlan", "InputCase",
           "SkippedInput", "about_case", "check_channels", "check_output_entry", "check_writable",
           "find_inputs", "is_scan", "jobs_to_do", "list_inputs", "output_suffix", "plan_cases",
           "plan_cohort", "plan_outputs", "predict_cases", "probabilities_path", "read_cases",
           "read_input", "shard", "single_scan", "unfinished", "write_prediction",
           "written_paths"]
