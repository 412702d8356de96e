"""Compression jobs (`flagstaff-job job=compress_*`): truncated SVD, FWSVD, WeLore, CoSpaDi and
M-FAC pruning of a trained model's linear and conv layers.

core: loading, layers, calibration statistics, checkpoints and the method registry; svd, fwsvd,
welore, cospadi, mfac: the methods; run: the jobs. See docs/jobs.md, "Compression jobs".
"""
