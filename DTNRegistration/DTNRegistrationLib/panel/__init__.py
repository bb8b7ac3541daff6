"""What the Slicer panel needs before (and without) torch: the Python environment and GPUs, model descriptions,
and the sample data. No torch, no SimpleITK, no Slicer; runs on Slicer's Python 3.9."""
