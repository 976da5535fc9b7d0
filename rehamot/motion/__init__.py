"""Motions as a viewer sees them: geometry and pictures, numpy (scipy, matplotlib) only.

`kinematics` recovers joint positions from HumanML3D (263-d) and KIT-ML (251-d) features;
`features` computes HumanML3D's 263-d features from joint positions, as HumanML3D does;
`skeletons` brings other skeletons (SMPL-H, SMPL-X, KIT-ML), frame rates, up axes and units
onto HumanML3D's 22 joints at 20 fps; `stick_figure` draws motions as GIF/MP4 animations and
PNG key-pose strips; `physics` measures jitter, foot skating, penetration and floating on
the joints; `cli` is `rehamot-render`. Imports nothing else of rehamot's, and no
torch: shards/, the page and the evaluators all build on it.
"""
