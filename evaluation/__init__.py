"""Evaluation: survival metrics, BBC-CV selection and the names of every metric and record a study writes.

`evaluation.metrics` (Harrell's and Uno's C, Brier score, IBS, AUC, bootstrap intervals),
`evaluation.selection` (BBC-CV, and BBC-CV replaying ASHA) and `evaluation.metric_names`: numpy and
numba only, no training or tracking framework, so that training (`trainables`) and analysis
(`analysis`, `study`) use the same definitions without importing each other.
"""
