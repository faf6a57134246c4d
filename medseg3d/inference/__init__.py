"""From a scan to a label map: the execution plan (device, precision, memory; decided once),
preprocessing, the sliding-window engine, postprocessing and corrections."""
