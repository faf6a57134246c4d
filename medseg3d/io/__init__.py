"""Reading and writing scans and label maps: volumes, DICOM, atomic writes, locks, safe paths."""
