"""Motions as a viewer sees them: geometry and pictures, numpy (and matplotlib) only.

`kinematics` recovers joint positions from HumanML3D (263-d) and KIT-ML (251-d) features;
`stick_figure` draws them as GIF/MP4 animations and PNG key-pose strips; `cli` is
`rehamot-render`. Imports nothing else of rehamot's, and no torch: shards/, the page and the
evaluators all build on it.
"""
