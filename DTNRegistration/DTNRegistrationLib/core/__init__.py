"""The engine: one registration, from two images to a deformation and its measures (torch, numpy, SimpleITK).

Nothing is imported here, so that a face imports only what it uses (the Slicer process never loads torch).
"""
