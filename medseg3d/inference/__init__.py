"""From a scan to a label map: preprocessing, the sliding-window engine, precision,
postprocessing and corrections."""
